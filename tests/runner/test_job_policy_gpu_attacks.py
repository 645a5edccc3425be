"""Red team of ``shieldml policy init --from-job`` for a job with ``[gpu]`` (commit 7cb2afe):
``--set gpu.FIELD=VALUE`` values that would make the written policy accept more than it says
(a weaker count, CC mode, OCSP or RIM check; TOML injected through the comma-split strings)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from shieldml.cli import main
from shieldml.errors import PolicyError
from shieldml.policy import Policy
from shieldml.runner.job_policy import policy_from_job
from shieldml.runner.manifest import JobManifest

CPU = {"mrtd": "ab" * 48, "mr_config_id": "00" * 48}


def write_job(tmp_path: Path, tee: str = "tdx", sim: str = "") -> JobManifest:
    (tmp_path / "infer.py").write_text("print('hi')\n")
    job = tmp_path / "job.toml"
    assert main(["job", "init", str(tmp_path / "infer.py"), "-o", str(job), "--tee", tee]) == 0
    text = job.read_text()
    if tee == "simulated":
        start, end = text.index("[simulated]"), text.index("[[trusted]]")
        table = f'[simulated]\nplatform = "{tmp_path / "sim"}"\nkind = "tdx"\n{sim}\n'
        text = text[:start] + text[end:] + "\n" + table
    job.write_text(text + '\n[gpu]\nevidence = "nvml"\n')
    return JobManifest.load(job)


def gpu_table(text: str) -> dict[str, Any]:
    (profile,) = tomllib.loads(text)["profile"]
    return dict(profile["gpu"])


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("count", "0", "count must be an integer from 1 to 16"),
        ("count", "17", "count must be an integer from 1 to 16"),
        ("count", "true", "count must be an integer"),
        ("count", '"2"', "count must be an integer"),
        ("count", "any", "count must be an integer"),
        ("count", "[1, 2]", "count must be an integer"),
        ("cc_mode", "devtools", 'cc_mode must be "on"'),
        ("cc_mode", "off", 'cc_mode must be "on"'),
        ("cc_mode", "any", 'cc_mode must be "on"'),
        ("ocsp", "off", 'ocsp must be "required" or "not-required"'),
        ("ocsp", "any", 'ocsp must be "required" or "not-required"'),
        ("rim_required", "no", "rim_required: must be true or false"),
        ("rim_required", '"false"', "rim_required: must be true or false"),
        ("ocsp_allow_cached", "1", "ocsp_allow_cached: must be true or false"),
        ("ocsp_max_age", "-1", "ocsp_max_age must be a number of seconds"),
        ("driver_version", ",", "must be a string, a non-empty list"),
        ("driver_version", "any,550.90.07", "not a dotted version"),
        ("driver_version", "ANY", "not a dotted version"),
        ("vbios_version", "", "must be a string, a non-empty list"),
        ("min_driver_version", "", "not a dotted version"),
        ("arch", "hopper,ampere", "arch must be among"),
        ("rim_ids", ",,", "must be a string, a non-empty list"),
    ],
)
def test_weakening_gpu_values_are_refused(tmp_path: Path, field: str, value: str, match: str):
    m = write_job(tmp_path)
    with pytest.raises(PolicyError, match=match):
        policy_from_job(m, values={**CPU, f"gpu.{field}": value})


@pytest.mark.parametrize(
    ("field", "value"),
    [("count", "1.5"), ("ocsp_max_age", "inf"), ("ocsp_max_age", "1970-01-01")],
)
def test_float_or_date_gpu_value_is_a_policy_error(tmp_path: Path, field: str, value: str):
    m = write_job(tmp_path)
    with pytest.raises(PolicyError, match="neither an integer, a boolean, a string"):
        policy_from_job(m, values={**CPU, f"gpu.{field}": value})


EVIL = 'X"] }\ninsecure_allow_debug = true\ncount = 16\n[x]\ny = ["'


@pytest.mark.parametrize(
    ("field", "match"),
    [
        ("driver_version", "not a dotted version"),
        ("vbios_version", "not a dotted version"),
        ("arch", "arch must be among"),
    ],
)
def test_toml_injected_through_a_checked_gpu_list_is_refused(
    tmp_path: Path, field: str, match: str
):
    m = write_job(tmp_path)
    with pytest.raises(PolicyError, match=match):
        policy_from_job(m, values={**CPU, f"gpu.{field}": EVIL})


def test_toml_injected_through_rim_ids_stays_one_string(tmp_path: Path):
    """rim_ids are not checked for form: a value that closes the list and adds
    ``insecure_allow_debug`` / ``count`` / a table is one escaped string of the list."""
    m = write_job(tmp_path)
    text = policy_from_job(m, values={**CPU, "gpu.rim_ids": EVIL + ", NV_OTHER"}).text
    doc = tomllib.loads(text)
    (profile,) = doc["profile"]
    assert set(doc) == {"version", "profile"} and "insecure_allow_debug" not in profile
    assert profile["gpu"]["rim_ids"] == [EVIL.strip(), "NV_OTHER"]
    assert profile["gpu"]["count"] == 1
    parsed = Policy.from_toml(text).profiles[0]
    assert parsed.insecure == frozenset()
    assert parsed.gpu is not None and parsed.gpu.rim_ids == frozenset({EVIL.strip(), "NV_OTHER"})


@pytest.mark.parametrize("field", ["count", "rim_required", "ocsp_max_age", "ocsp_allow_cached"])
def test_toml_value_with_trailing_document_injects_nothing(tmp_path: Path, field: str):
    """parse_value reads ``v = RAW`` as a TOML document: what RAW adds after the value is not
    carried into the policy."""
    m = write_job(tmp_path)
    raw = {"count": "2", "rim_required": "true", "ocsp_max_age": "60", "ocsp_allow_cached": "false"}
    text = policy_from_job(
        m, values={**CPU, f"gpu.{field}": raw[field] + "\ninsecure_allow_debug = true"}
    ).text
    (profile,) = tomllib.loads(text)["profile"]
    assert "insecure_allow_debug" not in profile
    assert profile["gpu"][field] == tomllib.loads(f"v = {raw[field]}")["v"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("min_driver_version", '550.90.07"\ninsecure_allow_debug = true\nx = "'), ("ocsp", "x\ny")],
)
def test_raw_string_gpu_values_are_escaped_or_refused(tmp_path: Path, field: str, value: str):
    m = write_job(tmp_path)
    with pytest.raises(PolicyError):
        policy_from_job(m, values={**CPU, f"gpu.{field}": value})


def test_real_job_gpu_policy_defaults_fail_closed(tmp_path: Path):
    """Without --set gpu.*: exactly one GPU, in CC mode, RIMs and current OCSP required; the
    default does not accept several GPUs, devtools mode or missing collateral."""
    m = write_job(tmp_path)
    text = policy_from_job(m, values=CPU).text
    gpu = Policy.from_toml(text).profiles[0].gpu
    assert gpu is not None
    assert (gpu.count, gpu.rim_required, gpu.ocsp_required, gpu.ocsp_allow_cached) == (
        1,
        True,
        True,
        False,
    )
    assert "insecure_allow_simulated" not in tomllib.loads(text)["profile"][0]


def test_simulated_job_gpu_policy_pins_what_simulated_says(tmp_path: Path):
    m = write_job(
        tmp_path,
        "simulated",
        'gpus = "3"\ngpu_driver = "535.104.05"\ngpu_vbios = "96.00.74.00.1C"\n',
    )
    gpu = gpu_table(policy_from_job(m).text)
    assert gpu == {
        "count": 3,
        "driver_version": ["535.104.05"],
        "vbios_version": ["96.00.74.00.1C"],
        "rim_required": True,
        "ocsp": "required",
    }


def test_cc_mode_devtools_in_simulated_does_not_weaken_the_policy(tmp_path: Path):
    m = write_job(tmp_path, "simulated", 'gpu_cc = "devtools"\n')
    text = policy_from_job(m).text
    assert "cc_mode" not in gpu_table(text)  # the parser's default: "on" only
    assert Policy.from_toml(text).profiles[0].gpu is not None


def test_gpu_field_key_spelled_differently_is_refused(tmp_path: Path):
    m = write_job(tmp_path)
    for key in ("gpu.count ", "gpu.", "gpu.gpu.count", "GPU.count", "gpu"):
        with pytest.raises(PolicyError):
            policy_from_job(m, values={**CPU, key: "2"})
