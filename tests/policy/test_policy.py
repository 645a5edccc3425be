"""Release policies: schema checks, every clause evaluated, denials explain themselves."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from shieldml.attest import Claims, verify_evidence
from shieldml.errors import PolicyDenied, PolicyError
from shieldml.policy import Policy, evaluate, require
from shieldml.testing.simulated import SimulatedPlatform, fixed_clock

NOW = datetime(2026, 11, 29, tzinfo=UTC)
MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
MRSIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
WD = "sha256:" + "ab" * 32

SGX_POLICY = f"""
version = 1
[[profile]]
tee = "sgx"
mrenclave = ["{MRENCLAVE}"]
mrsigner = "{MRSIGNER}"
isv_prod_id = 0
min_isv_svn = 0
workload_digest = ["{WD}"]
tcb_status = ["UpToDate", "ConfigurationAndSWHardeningNeeded"]
advisory_ids = ["INTEL-SA-00289", "INTEL-SA-00615"]
"""


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.open(tmp_path_factory.mktemp("sim"), clock=fixed_clock(NOW))


def test_real_sgx_quote_accepted(sgx_claims: Claims):
    v = require(Policy.from_toml(SGX_POLICY), sgx_claims, WD)
    assert v.allowed and v.matched == 1
    assert all(c.passed for c in v.profiles[0].checks)
    names = [c.name for c in v.profiles[0].checks]
    assert {"root", "debug", "tcb_status", "advisory_ids", "mrenclave", "workload_digest"} <= set(
        names
    )


def test_default_tcb_status_is_only_up_to_date(sgx_claims: Claims):
    text = SGX_POLICY.replace(
        'tcb_status = ["UpToDate", "ConfigurationAndSWHardeningNeeded"]\n', ""
    )
    with pytest.raises(PolicyDenied) as e:
        require(Policy.from_toml(text), sgx_claims, WD)
    [check] = [c for c in e.value.verdict.profiles[0].checks if not c.passed]  # type: ignore[attr-defined]
    assert check.name == "tcb_status" and check.actual == "ConfigurationAndSWHardeningNeeded"
    assert "updates" in check.hint


def test_every_failure_is_reported_at_once(sgx_claims: Claims):
    text = SGX_POLICY.replace(MRENCLAVE, "00" * 32).replace(
        'advisory_ids = ["INTEL-SA-00289", "INTEL-SA-00615"]', "advisory_ids = []"
    )
    v = evaluate(Policy.from_toml(text), sgx_claims, "sha256:other")
    assert not v.allowed
    failed = {c.name for c in v.profiles[0].checks if not c.passed}
    assert failed == {"mrenclave", "advisory_ids", "workload_digest"}
    assert len(v.failures()) == 3


def test_any_profile_may_match(sim: SimulatedPlatform):
    quote, col = sim.tdx_quote(mrtd=b"\x01" * 48, now=NOW)
    claims = verify_evidence(quote, collateral=col, now=NOW, trust=sim.trust())
    text = (
        SGX_POLICY
        + f"""
[[profile]]
tee = "tdx"
mrtd = ["{"01" * 48}"]
rtmr0 = "any"
rtmr1 = "any"
rtmr2 = "any"
rtmr3 = "any"
mr_config_id = "any"
workload_digest = "any"
insecure_allow_simulated = true
"""
    )
    v = require(Policy.from_toml(text), claims)
    assert v.matched == 2 and v.profiles[1].insecure_used == ("insecure_allow_simulated",)
    assert not v.profiles[0].passed  # the SGX profile was evaluated and refused (wrong tee)


def test_simulated_and_debug_refused_by_default(sim: SimulatedPlatform):
    quote, col = sim.sgx_quote(mrenclave=bytes.fromhex(MRENCLAVE), debug=True, now=NOW)
    claims = verify_evidence(quote, collateral=col, now=NOW, trust=sim.trust())
    text = SGX_POLICY.replace(f'mrsigner = "{MRSIGNER}"', 'mrsigner = "any"')
    v = evaluate(Policy.from_toml(text), claims, WD)
    failed = {c.name for c in v.profiles[0].checks if not c.passed}
    assert failed == {"root", "debug"}
    text += "insecure_allow_simulated = true\ninsecure_allow_debug = true\n"
    assert evaluate(Policy.from_toml(text), claims, WD).allowed


def test_snp_profile(sim: SimulatedPlatform):
    report, vcek, chain = sim.snp_report(measurement=b"\x09" * 48, reported_tcb={"snp": 5}, now=NOW)
    crl = sim.amd_crl(now=NOW)
    claims = verify_evidence(
        report, vcek=vcek, cert_chain=chain, now=NOW, trust=sim.trust(), amd_crl=crl
    )
    text = f"""
[[profile]]
tee = "snp"
measurement = "{"09" * 48}"
host_data = "any"
min_reported_tcb = {{ bl = 3, snp = 8 }}
vmpl = 0
workload_digest = "any"
insecure_allow_simulated = true
"""
    v = evaluate(Policy.from_toml(text), claims)
    [failed] = [c for c in v.profiles[0].checks if not c.passed]
    assert failed.name == "min_reported_tcb" and "snp=5" in failed.actual


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "at least one"),
        ("version = 1\nprofile = []", "at least one"),
        ("version = 2\n[[profile]]\ntee='sgx'", "version"),
        ("colour = 'red'\n[[profile]]\ntee='sgx'", "unknown top-level"),
        ("[[profile]]\ntee = 'nope'", "tee must be"),
        ("[[profile]]\ntee = 'sgx'\nmrenclave = 'any'", "missing"),
        (SGX_POLICY + "mrtd = 'any'\n", "unknown field"),
        (SGX_POLICY.replace(MRENCLAVE, "abcd"), "expected 32"),
        (SGX_POLICY.replace(MRENCLAVE, "zz" * 32), "not hex"),
        (SGX_POLICY.replace('"UpToDate", ', '"OutOfDate", '), "insecure_allow_out_of_date"),
        (SGX_POLICY.replace('"UpToDate", ', '"Revoked", '), "Revoked"),
        (SGX_POLICY.replace('"UpToDate", ', '"Fine", '), "unknown TCB status"),
        (
            SGX_POLICY.replace(f'["{MRENCLAVE}"]', '"any"').replace(f'"{MRSIGNER}"', '"any"'),
            "pins none",
        ),
        (SGX_POLICY.replace("isv_prod_id = 0", "isv_prod_id = -1"), "non-negative"),
        ("[[profile", "not valid TOML"),
    ],
)
def test_invalid_policies_are_errors(text: str, message: str):
    with pytest.raises(PolicyError, match=message):
        Policy.from_toml(text)


def test_cli_check_and_eval(vectors: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    import json

    from shieldml.cli import main

    pol = tmp_path / "p.toml"
    pol.write_text(SGX_POLICY)
    assert main(["policy", "check", str(pol), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["valid"] is True
    d = vectors / "attestation" / "intel" / "phala"
    args = [
        "policy",
        "eval",
        str(pol),
        str(d / "sgx_quote.bin"),
        "--collateral",
        str(d / "sgx_quote_collateral.json"),
        "--at",
        "2025-07-01",
    ]
    assert main([*args, "--workload-digest", WD, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["allowed"] is True
    assert main([*args, "--workload-digest", "sha256:other", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["allowed"] is False and doc["profiles"][0]["checks"][-1]["name"] == "workload_digest"
    bad = tmp_path / "bad.toml"
    bad.write_text("[[profile]]\ntee = 'sgx'\n")
    assert main(["policy", "check", str(bad)]) == 1
    assert "every field must be set" in capsys.readouterr().err


def test_misspelled_policy_field_gets_did_you_mean_and_every_valid_field():
    text = SGX_POLICY.replace("min_isv_svn", "min_isvsvn")
    with pytest.raises(PolicyError, match="unknown field") as e:
        Policy.from_toml(text)
    hint = e.value.hint or ""
    assert "did you mean min_isvsvn -> min_isv_svn?" in hint
    assert "workload_digest" in hint and "insecure_allow_debug" in hint  # common fields listed too
