"""Red team of GPU evidence on the simulated platform (commit 7cb2afe): the hostile host rewrites
the job's unmeasured ``[simulated]`` table and the platform's ``gpus.json``, tampers with the
GPU evidence between NVML and the broker, replays it; a malicious (second owner's) broker
answers with a ``gpus`` list of its own making. Each test is named after its attack; an attack
that succeeds is marked ``xfail(strict=True)`` with what is wrong."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shieldml.broker import client as client_mod
from shieldml.errors import (
    BrokerError,
    EvidenceError,
    ExpiredError,
    FormatError,
    ManifestError,
)
from shieldml.policy import Policy
from shieldml.runner import run as run_mod
from shieldml.runner.evidence import SimulatedProvider, provider_for
from shieldml.runner.gpu import GpuEvidenceItem, NvmlGpuProvider, gpu_provider_for
from shieldml.runner.job_policy import policy_from_job
from shieldml.runner.manifest import JobManifest
from shieldml.runner.receipt import verify_receipt
from shieldml.runner.run import run_job
from shieldml.testing.simulated import SimulatedPlatform, system_clock
from shieldml.testing.simulated_gpu import GPUS_FILE, KEPT_GPUS, SimulatedGpu, open_gpus
from shieldml.testing.simulated_nvml import SimulatedNvml
from tests.runner.conftest import Job
from tests.runner.gpu_jobs import authorize, denial, failed_checks, gpu_job

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)


def refused_check(detail: Any) -> str:
    """The check that refused GPU evidence as not genuine (or not of this session)."""
    assert detail["reason"] == "GPU evidence is not genuine or not bound to this session"
    return str(detail["check"])


def tamper_evidence(
    monkeypatch: pytest.MonkeyPatch,
    edit: Callable[[list[GpuEvidenceItem]], list[GpuEvidenceItem]],
) -> list[list[GpuEvidenceItem]]:
    """The host between NVML and the request: ``edit`` rewrites each collected list (the
    untampered lists are returned, one per collection)."""
    seen: list[list[GpuEvidenceItem]] = []
    real = run_mod.gpu_provider_for

    def wrapped(m: JobManifest, log: Callable[[str], None]) -> NvmlGpuProvider:
        p = real(m, log)
        collect = p.collect

        def tampered(report_data: bytes) -> list[GpuEvidenceItem]:
            items = collect(report_data)
            seen.append(list(items))
            return edit(list(items))

        p.collect = tampered  # type: ignore[method-assign]
        return p

    monkeypatch.setattr(run_mod, "gpu_provider_for", wrapped)
    return seen


def malicious_broker(
    monkeypatch: pytest.MonkeyPatch, edit: Callable[[list[Any]], Any]
) -> list[list[Any]]:
    """The broker itself answers ``/v1/release`` with ``gpus`` = ``edit(its honest list)``
    (everything else as it is: the keys, the audit proof); the honest lists are returned."""
    honest: list[list[Any]] = []
    real = client_mod.BrokerClient._call

    def call(self: client_mod.BrokerClient, method: str, path: str, **kw: Any) -> Any:
        doc = real(self, method, path, **kw)
        if path == "/v1/release":
            honest.append(json.loads(json.dumps(doc.get("gpus"))))
            doc["gpus"] = edit(doc.get("gpus"))
        return doc

    monkeypatch.setattr(client_mod.BrokerClient, "_call", call)
    return honest


@pytest.fixture
def kept_family(job: Job) -> Iterator[Path]:
    """The platform's gpus.json, restored after a test that rewrites it (the host may)."""
    open_gpus(job.sim_dir, clock=system_clock)
    path = job.sim_dir / GPUS_FILE
    saved = path.read_bytes()
    yield path
    path.write_bytes(saved)


# -- a real TEE and the simulated GPUs ---------------------------------------------------------
@pytest.mark.parametrize("tee", ["tdx", "snp", "auto"])
def test_real_tee_job_with_simulated_gpu_keys_still_uses_real_nvml(
    job: Job, tee: str, monkeypatch: pytest.MonkeyPatch
):
    """The host adds [simulated] platform/gpus/gpu_cc to a real-TEE job (unmeasured keys) and
    sets env: the runner still asks the real NVML (``pynvml``), never the simulated one."""
    m = gpu_job(job, sim='gpus = "2"\ngpu_cc = "on"\n')
    simulated_digest = m.workload_digest()
    job.manifest.write_text(job.manifest.read_text().replace('tee = "simulated"', f'tee = "{tee}"'))
    real = JobManifest.load(job.manifest)
    assert real.tee == tee and real.simulated["platform"] == str(job.sim_dir)
    for k in ("SHIELDML_SIMULATED_PLATFORM", "SHIELDML_TEE", "SHIELDML_NVML"):
        monkeypatch.setenv(k, str(job.sim_dir) if "PLATFORM" in k else "simulated")
    p = gpu_provider_for(real, lambda _s: None)
    assert type(p) is NvmlGpuProvider and p.nvml is None  # None: the real pynvml module
    assert not isinstance(p.nvml, SimulatedNvml)
    # tee is measured: turning a real job into a simulated one changes what the owner approved
    assert real.workload_digest() != simulated_digest


@pytest.mark.skipif(
    Path("/dev/attestation/quote").exists() or Path("/sys/kernel/config/tsm/report").is_dir(),
    reason="this machine has a TEE",
)
def test_auto_tee_without_a_tee_does_not_fall_back_to_the_simulated_platform(job: Job):
    m = gpu_job(job)
    with pytest.raises(EvidenceError, match="no TEE found"):
        provider_for("auto", m.simulated, base=m.base)


# -- the host rewrites [simulated] (not measured) after the owner's policy ----------------------
@needs_root
def test_host_raises_simulated_gpu_count_above_the_policy(job: Job):
    approved = gpu_job(job)
    authorize(job, policy_from_job(approved).text)
    more = gpu_job(job, sim='gpus = "3"\n')
    assert more.workload_digest() == approved.workload_digest()  # unmeasured, as designed
    assert failed_checks(denial(job)) == {"gpu count": "3"}


@needs_root
def test_host_changes_simulated_vbios_without_changing_the_digest(job: Job):
    approved = gpu_job(job)
    authorize(job, policy_from_job(approved).text)
    other = gpu_job(job, sim='gpu_vbios = "96.00.74.00.1C"\n')
    assert other.workload_digest() == approved.workload_digest()
    checks = failed_checks(denial(job))
    assert set(checks) == {"gpu vbios_version"} and "96.00.74.00.1C" in checks["gpu vbios_version"]


# -- the host rewrites gpus.json -----------------------------------------------------------------
@needs_root
def test_same_gpu_presented_twice_does_not_satisfy_a_count_of_two(job: Job, kept_family: Path):
    authorize(job, policy_from_job(gpu_job(job, sim='gpus = "2"\n')).text)
    doc = json.loads(kept_family.read_text())
    doc["gpus"][1] = doc["gpus"][0]  # the host: GPU 1 is GPU 0 again
    kept_family.write_text(json.dumps(doc))
    receipt = job.dir / "receipt.json"
    try:
        assert refused_check(denial(job, BrokerError)) == "gpu distinct"
    finally:
        if receipt.exists():  # what the attack achieved: one GPU listed as two
            listed = json.loads(receipt.read_text())["receipt"]["gpus"]["owner"]
            assert len(listed) == 2 and listed[0]["ueid"] == listed[1]["ueid"]


@needs_root
def test_gpus_of_another_family_are_not_genuine(job: Job, kept_family: Path, tmp_path: Path):
    authorize(job, policy_from_job(gpu_job(job)).text)
    open_gpus(tmp_path / "other", clock=system_clock)
    kept_family.write_bytes((tmp_path / "other" / GPUS_FILE).read_bytes())
    assert refused_check(denial(job, BrokerError)) == "trust root"


@needs_root
def test_one_foreign_gpu_planted_among_the_family_is_not_genuine(
    job: Job, kept_family: Path, tmp_path: Path
):
    authorize(job, policy_from_job(gpu_job(job, sim='gpus = "2"\n')).text)
    open_gpus(tmp_path / "other", clock=system_clock)
    foreign = json.loads((tmp_path / "other" / GPUS_FILE).read_text())["gpus"][0]
    doc = json.loads(kept_family.read_text())
    doc["gpus"][1] = foreign
    kept_family.write_text(json.dumps(doc))
    assert refused_check(denial(job, BrokerError)) == "trust root"


# -- the host tampers with the evidence between NVML and the request ------------------------------
@needs_root
def test_gpu_evidence_order_swapped_is_refused(job: Job, monkeypatch: pytest.MonkeyPatch):
    authorize(job, policy_from_job(gpu_job(job, sim='gpus = "2"\n')).text)
    tamper_evidence(monkeypatch, lambda items: items[::-1])
    assert refused_check(denial(job, BrokerError)) == "nonce"


@needs_root
def test_report_of_one_gpu_with_the_chain_of_another_is_refused(
    job: Job, monkeypatch: pytest.MonkeyPatch
):
    """The family shares its roots: GPU 1's chain verifies, but did not sign GPU 0's report."""
    authorize(job, policy_from_job(gpu_job(job, sim='gpus = "2"\n')).text)
    seen = tamper_evidence(
        monkeypatch,
        lambda items: [replace(items[0], chain_pem=items[1].chain_pem), items[1]],
    )
    assert refused_check(denial(job, BrokerError)) == "report signature"
    assert seen and seen[0][0].chain_pem != seen[0][1].chain_pem


@needs_root
def test_gpu_evidence_replayed_from_an_earlier_session_is_refused(
    job: Job, monkeypatch: pytest.MonkeyPatch
):
    authorize(job, policy_from_job(gpu_job(job)).text)
    recorded: list[list[GpuEvidenceItem]] = []

    def record_or_replay(items: list[GpuEvidenceItem]) -> list[GpuEvidenceItem]:
        if not recorded:
            recorded.append(items)
            return items
        return recorded[0]

    tamper_evidence(monkeypatch, record_or_replay)
    assert run_job(job.manifest) == 0  # the first session, recorded
    (job.dir / "out" / "result.txt.enc").unlink()
    assert refused_check(denial(job, BrokerError)) == "nonce"


@needs_root
def test_devtools_evidence_relabelled_cc_on_is_refused(job: Job, monkeypatch: pytest.MonkeyPatch):
    authorize(job, policy_from_job(gpu_job(job)).text)
    gpu_job(job, sim='gpu_cc = "devtools"\n')
    seen = tamper_evidence(monkeypatch, lambda items: [replace(g, cc_mode="on") for g in items])
    assert refused_check(denial(job, BrokerError)) == "nonce"  # made for the devtools nonce
    assert seen[0][0].cc_mode == "devtools" and seen[0][0].report is not None


@needs_root
def test_gpu_evidence_dropped_to_cpu_only_keeps_gpu_table_and_is_refused(
    job: Job, monkeypatch: pytest.MonkeyPatch
):
    authorize(job, policy_from_job(gpu_job(job)).text)
    tamper_evidence(monkeypatch, lambda items: [])  # [gpu] kept (digest unchanged), no evidence
    assert failed_checks(denial(job)) == {"gpu count": "0"}


# -- a malicious broker's gpus answer -------------------------------------------------------------
@needs_root
@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda g: [], id="fewer"),
        pytest.param(lambda g: [*g, *g], id="more"),
        pytest.param(lambda g: ["hopper"] * len(g), id="not-dicts"),
        pytest.param(lambda g: {"0": g[0]}, id="not-a-list"),
    ],
)
def test_broker_answer_with_other_gpu_count_or_shape_is_refused_before_the_run(
    job: Job, monkeypatch: pytest.MonkeyPatch, answer: Callable[[list[Any]], Any]
):
    authorize(job, policy_from_job(gpu_job(job)).text)
    malicious_broker(monkeypatch, answer)
    with pytest.raises(BrokerError, match="the release's GPU list"):
        run_job(job.manifest)
    assert not (job.dir / "out" / "result.txt.enc").exists()


@needs_root
def test_broker_answer_naming_gpus_never_sent_is_refused(job: Job, monkeypatch: pytest.MonkeyPatch):
    policy = policy_from_job(gpu_job(job)).text
    authorize(job, policy)
    honest = malicious_broker(
        monkeypatch,
        lambda gpus: [{**g, "ueid": "1234567890", "root": "vendor"} for g in gpus],
    )
    receipt = job.dir / "receipt.json"
    try:
        with pytest.raises(BrokerError, match="names another GPU 0 than the one whose evidence"):
            run_job(job.manifest, receipt=str(receipt))
    finally:
        if receipt.exists():  # what the attack achieved: a receipt claiming an unseen GPU
            listed = json.loads(receipt.read_text())["receipt"]["gpus"]["owner"]
            assert honest and listed[0]["ueid"] == "1234567890" != honest[0][0]["ueid"]
            assert listed[0]["root"] == "vendor"
            # and `receipt verify` accepts it: the listing is checked only against the policy
            trust = SimulatedPlatform.open(job.sim_dir, clock=system_clock).trust()
            verified = verify_receipt(str(receipt), policy=Policy.from_toml(policy), trust=trust)
            assert verified.body["gpus"]["owner"][0]["ueid"] == "1234567890"


@needs_root
def test_broker_answer_with_huge_and_extra_gpu_fields_is_refused(
    job: Job, monkeypatch: pytest.MonkeyPatch
):
    authorize(job, policy_from_job(gpu_job(job)).text)
    malicious_broker(
        monkeypatch,
        lambda gpus: [{**g, "verified_by_nvidia": True, "note": "x" * 4_000_000} for g in gpus],
    )
    receipt = job.dir / "receipt.json"
    with pytest.raises(BrokerError, match="other fields than a GPU summary's"):
        run_job(job.manifest, receipt=str(receipt))
    assert not receipt.exists()


@needs_root
def test_broker_gpus_answer_reaches_the_receipt_as_the_broker_verified_it(job: Job):
    """The defended baseline of the two attacks above: an honest answer equals the broker's
    audit record of the release, and is bound by the receipt's evidence."""
    authorize(job, policy_from_job(gpu_job(job, sim='gpus = "2"\n')).text)
    receipt = job.dir / "receipt.json"
    assert run_job(job.manifest, receipt=str(receipt)) == 0
    body = json.loads(receipt.read_text())["receipt"]
    listed = body["gpus"]["owner"]
    record = body["broker_audit_log"]["owner"]["record"]["data"]["gpus"]
    assert listed == record and len({g["ueid"] for g in listed}) == 2


# -- manifest validation of [simulated] GPU keys --------------------------------------------------
@pytest.mark.parametrize("value", ["-1", "+1", " 1", "1.0", "0x2", "", "1e1"])
def test_odd_simulated_gpu_counts_are_manifest_errors(job: Job, value: str):
    with pytest.raises(ManifestError, match="gpus must be 1 to 16"):
        gpu_job(job, sim=f'gpus = "{value}"\n')


def test_superscript_digit_simulated_gpu_count_is_a_manifest_error(job: Job):
    with pytest.raises(ManifestError, match="gpus must be 1 to 16"):
        gpu_job(job, sim='gpus = "²"\n')


@pytest.mark.parametrize(
    "sim",
    ['gpu_cc = "ON"\n', 'gpu_cc = " on"\n', 'gpu_vbios = "96.00.9F.00.100"\n'],
)
def test_spoofed_simulated_cc_and_vbios_spellings_are_manifest_errors(job: Job, sim: str):
    with pytest.raises(ManifestError):
        gpu_job(job, sim=sim)


def test_simulated_gpu_keys_are_not_measurements(sim_dir: Path):
    gpu_keys = {"gpus": "2", "gpu_cc": "off", "gpu_driver": "1.2.3", "gpu_vbios": "96.00.9F.00.01"}
    p = SimulatedProvider(sim_dir, "tdx", {"platform": str(sim_dir), **gpu_keys})
    assert p.m == {}
    pinned = SimulatedProvider(sim_dir, "tdx", {**gpu_keys, "mrtd": "ab" * 48})
    assert pinned.m == {"mrtd": bytes.fromhex("ab" * 48)}  # the filter takes only gpu* keys


# -- open_gpus: the kept family -------------------------------------------------------------------
def _open_ueids(d: str) -> list[str]:
    return [str(g.chain[0].cert.serial_number) for g in open_gpus(d, clock=system_clock)]


def test_concurrent_first_openers_all_get_one_family(tmp_path: Path):
    d = tmp_path / "fresh"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(6) as pool:
        families = pool.map(_open_ueids, [str(d)] * 6)
    assert len(families[0]) == KEPT_GPUS and len(set(families[0])) == KEPT_GPUS
    assert all(f == families[0] for f in families)
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".gpus-")) == []
    assert _open_ueids(str(d)) == families[0]


def test_kept_family_private_keys_are_owner_only(tmp_path: Path):
    open_gpus(tmp_path / "p", clock=system_clock)
    mode = stat.S_IMODE((tmp_path / "p" / GPUS_FILE).stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) & 0o077 == 0


def test_expired_kept_family_is_refused(tmp_path: Path):
    open_gpus(tmp_path / "p", clock=system_clock)
    with pytest.raises(ExpiredError, match="valid"):
        open_gpus(tmp_path / "p", clock=lambda: datetime(2099, 1, 1, tzinfo=UTC))


def _kept_gpu() -> dict[str, Any]:
    return SimulatedGpu.family(1, system_clock())[0].to_json()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda g: '{"gpus": [', id="truncated"),
        pytest.param(lambda g: "[]", id="a-list"),
        pytest.param(lambda g: '{"gpus": []}', id="no-gpus"),
        pytest.param(lambda g: json.dumps({"gpus": [1]}), id="gpu-not-a-table"),
        pytest.param(
            lambda g: json.dumps({"gpus": [{**g, "chain": g["chain"][:4]}]}), id="short-chain"
        ),
        pytest.param(lambda g: json.dumps({"gpus": [{**g, "fwid": "zz"}]}), id="fwid-not-hex"),
        pytest.param(
            lambda g: json.dumps(
                {"gpus": [{**g, "chain": [{**g["chain"][0], "cert": "junk"}, *g["chain"][1:]]}]}
            ),
            id="cert-junk",
        ),
        pytest.param(lambda g: b"\xff\xfe{}", id="not-utf8"),
    ],
)
def test_damaged_kept_family_is_a_format_error(
    tmp_path: Path, damage: Callable[[dict[str, Any]], str | bytes]
):
    d = tmp_path / "p"
    d.mkdir()
    bad = damage(_kept_gpu())
    (d / GPUS_FILE).write_bytes(bad if isinstance(bad, bytes) else bad.encode())
    with pytest.raises(FormatError):
        open_gpus(d, clock=system_clock)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(
            lambda g: json.dumps(
                {"gpus": [{**g, "chain": [{**g["chain"][0], "key": 7}, *g["chain"][1:]]}]}
            ),
            id="key-a-number",
        ),
        pytest.param(lambda g: "[" * 200_000 + "]" * 200_000, id="deeply-nested"),
    ],
)
def test_damaged_kept_family_key_or_nesting_is_a_format_error_not_a_traceback(
    tmp_path: Path, damage: Callable[[dict[str, Any]], str]
):
    d = tmp_path / "p"
    d.mkdir()
    (d / GPUS_FILE).write_text(damage(_kept_gpu()))
    with pytest.raises(FormatError):
        open_gpus(d, clock=system_clock)
