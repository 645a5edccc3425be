"""Policies pin what binds a job to its confidential VM (issue 12, point 7).

On TDX and SEV-SNP any root process in the VM can write report data, so the workload digest in
report data is a claim. What the host cannot forge is what the VM was launched with: TDX
MRCONFIGID / MROWNER / MROWNERCONFIG and SEV-SNP HOST_DATA (set at launch, e.g. to the digest of
a Confidential Containers initdata document) and the ID-block keys. A policy pins them, and a VM
launched for another job or with other initdata is refused with expected vs found.

The evidence comes from the runner's simulated provider with ``[simulated]`` launch values, the
way a job manifest sets them, and goes through the real verifiers at a fixed time.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shieldml.attest import Claims, IntelCollateral, Quote, SnpReport, verify_evidence
from shieldml.attest._intel_quote import TdReportBody
from shieldml.errors import PolicyDenied, PolicyError
from shieldml.policy import Policy, Verdict, evaluate, initdata_digest, initdata_field, require
from shieldml.runner.evidence import Evidence, SimulatedProvider
from shieldml.testing.simulated import SimulatedPlatform, fixed_clock

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
MRTD = "5d" * 48
MEASUREMENT = "9a" * 48
INITDATA = b"""algorithm = "sha384"
version = "0.1.0"

[data]
"policy.rego" = '''
package agent_policy
default ExecProcessRequest := false
'''
"""
OTHER_INITDATA = INITDATA.replace(b":= false", b":= true")  # a VM one could `kubectl exec` into


@pytest.fixture(scope="module")
def providers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SimulatedProvider]:
    d = tmp_path_factory.mktemp("sim")
    SimulatedPlatform.open(d, clock=fixed_clock(NOW))
    return {
        kind: SimulatedProvider(d, kind, {}, clock=fixed_clock(NOW), extend="off")
        for kind in ("tdx", "snp")
    }


def _claims(providers: dict[str, SimulatedProvider], kind: str, **launch: str) -> Claims:
    """Verified claims from a simulated VM launched with ``launch`` (hex, as [simulated] gives
    them: what the host set when it started the VM)."""
    provider = providers[kind]
    ident = {"mrtd": MRTD} if kind == "tdx" else {"measurement": MEASUREMENT}
    provider.m = {k: bytes.fromhex(v) for k, v in {**ident, **launch}.items()}
    ev: Evidence = provider.evidence(bytes(64))
    col = IntelCollateral.from_json(json.dumps(ev.collateral)) if ev.collateral else None
    crl = provider.platform.amd_crl(now=NOW) if kind == "snp" else None
    return verify_evidence(
        ev.data, collateral=col, vcek=ev.vcek, now=NOW, trust=provider.platform.trust(), amd_crl=crl
    )


def test_simulated_provider_takes_launch_values_from_the_manifest(tmp_path: Path):
    SimulatedPlatform.open(tmp_path, clock=fixed_clock(NOW))
    launch = {"mr_config_id": "c1" * 48, "mr_owner": "0a" * 48, "mr_owner_config": "0b" * 48}
    ev = SimulatedProvider(tmp_path, "tdx", launch, clock=fixed_clock(NOW)).evidence(bytes(64))
    body = Quote.from_bytes(ev.data).body
    assert isinstance(body, TdReportBody)
    assert (body.mr_config_id.hex(), body.mr_owner.hex(), body.mr_owner_config.hex()) == tuple(
        launch.values()
    )
    launch = {"host_data": "d1" * 32, "id_key_digest": "e1" * 48, "author_key_digest": "e2" * 48}
    ev = SimulatedProvider(tmp_path, "snp", launch, clock=fixed_clock(NOW)).evidence(bytes(64))
    r = SnpReport.from_bytes(ev.data)
    assert (r.host_data.hex(), r.id_key_digest.hex(), r.author_key_digest.hex()) == tuple(
        launch.values()
    )


def tdx_policy(**pins: str) -> Policy:
    fields = {
        "mrtd": f'"{MRTD}"', "rtmr0": '"any"', "rtmr1": '"any"', "rtmr2": '"any"',
        "rtmr3": '"any"', "mr_config_id": '"any"', **pins,
    }  # fmt: skip
    lines = ["[[profile]]", 'tee = "tdx"', *(f"{k} = {v}" for k, v in fields.items() if v)]
    lines += ['workload_digest = "any"', "insecure_allow_simulated = true"]
    return Policy.from_toml("\n".join(lines) + "\n")


def snp_policy(**pins: str) -> Policy:
    fields = {
        "measurement": f'"{MEASUREMENT}"', "host_data": '"any"', "vmpl": "0",
        "min_reported_tcb": "{ bl = 3, snp = 8 }", **pins,
    }  # fmt: skip
    lines = ["[[profile]]", 'tee = "snp"', *(f"{k} = {v}" for k, v in fields.items() if v)]
    lines += ['workload_digest = "any"', "insecure_allow_simulated = true"]
    return Policy.from_toml("\n".join(lines) + "\n")


def _denied(policy: Policy, claims: Claims) -> dict[str, tuple[str, str]]:
    with pytest.raises(PolicyDenied) as e:
        require(policy, claims)
    verdict = e.value.verdict
    assert isinstance(verdict, Verdict)
    return {c.name: (c.expected, c.actual) for c in verdict.profiles[0].checks if not c.passed}


# -- TDX ----------------------------------------------------------------------------------------


def test_policy_pinning_mr_config_id_denies_a_vm_launched_for_another_job(
    providers: dict[str, SimulatedProvider],
):
    job, other = "c1" * 48, "c2" * 48
    policy = tdx_policy(mr_config_id=f'["{job}"]')
    assert require(policy, _claims(providers, "tdx", mr_config_id=job)).allowed
    failed = _denied(policy, _claims(providers, "tdx", mr_config_id=other))
    assert failed == {"mr_config_id": (job, other)}


@pytest.mark.parametrize("field", ["mr_owner", "mr_owner_config"])
def test_policy_pinning_mr_owner_denies_a_td_launched_for_another_owner(
    providers: dict[str, SimulatedProvider], field: str
):
    mine, theirs = "0a" * 48, "0b" * 48
    policy = tdx_policy(**{field: f'"{mine}"'})
    assert require(policy, _claims(providers, "tdx", **{field: mine})).allowed
    assert _denied(policy, _claims(providers, "tdx", **{field: theirs})) == {field: (mine, theirs)}


def test_initdata_digest_pins_mr_config_id_and_denies_a_vm_launched_with_other_initdata(
    providers: dict[str, SimulatedProvider],
):
    digest = initdata_digest(INITDATA)  # sha384, the document's own `algorithm`
    assert digest == "sha384:" + hashlib.sha384(INITDATA).hexdigest()
    launched = hashlib.sha384(INITDATA).hexdigest()  # 48 bytes: MRCONFIGID as is
    policy = tdx_policy(mr_config_id="", initdata_digest=f'"{digest}"')
    assert require(policy, _claims(providers, "tdx", mr_config_id=launched)).allowed
    other = hashlib.sha384(OTHER_INITDATA).hexdigest()
    failed = _denied(policy, _claims(providers, "tdx", mr_config_id=other))
    assert failed == {"initdata_digest": (f"mr_config_id {launched}", f"mr_config_id {other}")}


def test_sha256_initdata_digest_is_zero_padded_into_mr_config_id(
    providers: dict[str, SimulatedProvider],
):
    digest = initdata_digest(INITDATA, "sha256")
    padded = hashlib.sha256(INITDATA).hexdigest() + "00" * 16
    policy = tdx_policy(mr_config_id="", initdata_digest=f'"{digest}"')
    assert require(policy, _claims(providers, "tdx", mr_config_id=padded)).allowed
    unpadded_elsewhere = "00" * 16 + hashlib.sha256(INITDATA).hexdigest()
    assert "initdata_digest" in _denied(
        policy, _claims(providers, "tdx", mr_config_id=unpadded_elsewhere)
    )


# -- SEV-SNP ------------------------------------------------------------------------------------


def test_policy_pinning_host_data_denies_a_vm_launched_for_another_job(
    providers: dict[str, SimulatedProvider],
):
    job, other = "d1" * 32, "d2" * 32
    policy = snp_policy(host_data=f'"{job}"')
    assert require(policy, _claims(providers, "snp", host_data=job)).allowed
    assert _denied(policy, _claims(providers, "snp", host_data=other)) == {
        "host_data": (job, other)
    }


def test_initdata_digest_pins_host_data_and_denies_a_vm_launched_with_other_initdata(
    providers: dict[str, SimulatedProvider],
):
    digest = initdata_digest(INITDATA)  # SHA-384: HOST_DATA keeps its first 32 bytes
    launched = hashlib.sha384(INITDATA).hexdigest()[:64]
    policy = snp_policy(host_data="", initdata_digest=f'"{digest}"')
    assert require(policy, _claims(providers, "snp", host_data=launched)).allowed
    other = hashlib.sha384(OTHER_INITDATA).hexdigest()[:64]
    failed = _denied(policy, _claims(providers, "snp", host_data=other))
    assert failed == {"initdata_digest": (f"host_data {launched}", f"host_data {other}")}


@pytest.mark.parametrize("field", ["id_key_digest", "author_key_digest"])
def test_policy_pinning_id_keys_denies_a_vm_whose_id_block_another_key_signed(
    providers: dict[str, SimulatedProvider], field: str
):
    mine, theirs = "e1" * 48, "e2" * 48
    policy = snp_policy(**{field: f'"{mine}"'})
    assert require(policy, _claims(providers, "snp", **{field: mine})).allowed
    assert _denied(policy, _claims(providers, "snp", **{field: theirs})) == {field: (mine, theirs)}


def test_initdata_digest_with_the_measurement_names_an_snp_vm(
    providers: dict[str, SimulatedProvider],
):
    """HOST_DATA pinned through initdata binds the launch; the measurement names the code."""
    digest = initdata_digest(INITDATA)
    policy = snp_policy(host_data="", initdata_digest=f'"{digest}"')
    launched = hashlib.sha384(INITDATA).hexdigest()[:64]
    assert evaluate(policy, _claims(providers, "snp", host_data=launched)).allowed
    with pytest.raises(PolicyError, match="measurement must be pinned"):
        snp_policy(measurement='"any"', host_data="", initdata_digest=f'"{digest}"')


# -- schema -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pins", "message"),
    [
        ({"initdata_digest": '"sha384:' + "00" * 48 + '"'}, "give one of them"),
        ({"mr_config_id": ""}, r"missing mr_config_id \(or initdata_digest\)"),
        ({"mr_config_id": "", "initdata_digest": '"md5:' + "00" * 16 + '"'}, "ALGORITHM:HEX"),
        ({"mr_config_id": "", "initdata_digest": '"sha256:' + "00" * 48 + '"'}, "32 bytes"),
        ({"mr_config_id": "", "initdata_digest": '"' + "00" * 48 + '"'}, "ALGORITHM:HEX"),
        ({"mr_owner": '"abcd"'}, "expected 48"),
    ],
)
def test_invalid_vm_binding_pins_are_errors(pins: dict[str, str], message: str):
    with pytest.raises(PolicyError, match=message):
        tdx_policy(**pins)


def test_new_fields_are_optional_and_existing_policies_still_load():
    p = tdx_policy().profiles[0]
    assert p.refs["mr_owner"] == "any" and p.refs["mr_owner_config"] == "any"
    assert "initdata_digest" not in p.refs
    q = snp_policy().profiles[0]
    assert q.refs["id_key_digest"] == "any" and q.refs["author_key_digest"] == "any"


def test_initdata_field_follows_the_coco_padding_and_truncation_rules():
    d256, d384, d512 = (hashlib.new(a, b"x").digest() for a in ("sha256", "sha384", "sha512"))
    assert initdata_field("sha256:" + d256.hex(), 48) == d256 + bytes(16)
    assert initdata_field("sha384:" + d384.hex(), 48) == d384
    assert initdata_field("sha512:" + d512.hex(), 48) == d512[:48]
    assert initdata_field("sha384:" + d384.hex(), 32) == d384[:32]
    assert initdata_field("SHA-256:" + d256.hex(), 32) == d256
    assert (
        initdata_digest(b'version = "0.1.0"\n')
        == "sha384:" + hashlib.sha384(b'version = "0.1.0"\n').hexdigest()
    )
    with pytest.raises(PolicyError, match="not one of"):
        initdata_digest(b'algorithm = "md5"\n')
