"""Policies that identify code (issue 13, point 3).

The review's attack: a profile pinning SEV-SNP ``host_data`` alone, or TDX RTMRs with ``mrtd =
"any"``, loaded, and evidence with a random launch measurement (other firmware and kernel, the
host's own VM reproducing HOST_DATA or the RTMR values) was allowed. ``host_data`` and
MRCONFIGID are set by whoever launches the VM and RTMRs are extended by code inside it, so only
the launch measurement names the code: ``measurement`` (SNP) and ``mrtd`` (TDX) must be pinned.
Policies may also require TD attributes (``SEPT_VE_DISABLE``), XFAM and SNP guest-policy bits.

Evidence comes from the simulated platform through the real verifiers at a fixed time.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest

from shieldml.attest import Claims, verify_evidence
from shieldml.errors import PolicyDenied, PolicyError
from shieldml.policy import Policy, Verdict, evaluate, require
from shieldml.testing.simulated import SimulatedPlatform, fixed_clock

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
MRTD = bytes.fromhex("5d" * 48)
MEASUREMENT = bytes.fromhex("9a" * 48)
HOST_DATA = bytes.fromhex("d1" * 32)
RTMR = bytes.fromhex("7e" * 48)
SNP_SMT = 1 << 16
SNP_MIGRATE_MA = 1 << 18
SNP_RESERVED_ONE = 1 << 17


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.open(tmp_path_factory.mktemp("sim"), clock=fixed_clock(NOW))


def tdx_claims(sim: SimulatedPlatform, **kw: object) -> Claims:
    quote, col = sim.tdx_quote(**{"mrtd": MRTD, "rtmrs": (RTMR,) * 4, **kw}, now=NOW)  # type: ignore[arg-type]
    return verify_evidence(quote, collateral=col, now=NOW, trust=sim.trust())


def snp_claims(sim: SimulatedPlatform, **kw: object) -> Claims:
    report, vcek, chain = sim.snp_report(
        **{"measurement": MEASUREMENT, "host_data": HOST_DATA, **kw},
        now=NOW,  # type: ignore[arg-type]
    )
    return verify_evidence(
        report,
        vcek=vcek,
        cert_chain=chain,
        now=NOW,
        trust=sim.trust(),
        amd_crl=sim.amd_crl(now=NOW),
    )


def tdx_policy(**fields: str) -> Policy:
    f = {
        "mrtd": f'"{MRTD.hex()}"',
        "mr_config_id": '"any"',
        **{f"rtmr{i}": f'"{RTMR.hex()}"' for i in range(4)},
    }
    f.update(fields)
    lines = ["[[profile]]", 'tee = "tdx"', *(f"{k} = {v}" for k, v in f.items())]
    return Policy.from_toml(
        "\n".join([*lines, 'workload_digest = "any"', "insecure_allow_simulated = true"]) + "\n"
    )


def snp_policy(**fields: str) -> Policy:
    f = {"measurement": f'"{MEASUREMENT.hex()}"', "host_data": f'"{HOST_DATA.hex()}"', "vmpl": "0",
         "min_reported_tcb": "{ bl = 3, snp = 8 }"}  # fmt: skip
    f.update(fields)
    lines = ["[[profile]]", 'tee = "snp"', *(f"{k} = {v}" for k, v in f.items())]
    return Policy.from_toml(
        "\n".join([*lines, 'workload_digest = "any"', "insecure_allow_simulated = true"]) + "\n"
    )


def denied(policy: Policy, claims: Claims) -> dict[str, tuple[str, str]]:
    with pytest.raises(PolicyDenied) as e:
        require(policy, claims)
    assert isinstance(e.value.verdict, Verdict)
    return {
        c.name: (c.expected, c.actual) for c in e.value.verdict.profiles[0].checks if not c.passed
    }


# -- the launch measurement must be pinned -------------------------------------------------------


def test_snp_profile_pinning_host_data_alone_is_refused(sim: SimulatedPlatform):
    with pytest.raises(PolicyError, match="measurement must be pinned for snp") as e:
        snp_policy(measurement='"any"')
    assert "set or extended by whoever launches" in (e.value.hint or "")
    # pinned, a VM of other code that reproduces HOST_DATA is denied
    other = snp_claims(sim, measurement=os.urandom(48))
    assert set(denied(snp_policy(), other)) == {"measurement"}
    assert require(snp_policy(), snp_claims(sim)).allowed


def test_tdx_profile_pinning_rtmrs_with_mrtd_any_is_refused(sim: SimulatedPlatform):
    with pytest.raises(PolicyError, match="mrtd must be pinned for tdx"):
        tdx_policy(mrtd='"any"')
    other = tdx_claims(sim, mrtd=os.urandom(48))  # other firmware, the same RTMR values
    assert set(denied(tdx_policy(), other)) == {"mrtd"}
    assert require(tdx_policy(), tdx_claims(sim)).allowed


# -- TD attributes and XFAM ----------------------------------------------------------------------


def test_policy_requiring_sept_ve_disable_denies_a_td_launched_without_it(sim: SimulatedPlatform):
    policy = tdx_policy(sept_ve_disable="true")
    assert require(policy, tdx_claims(sim, sept_ve_disable=True)).allowed
    assert denied(policy, tdx_claims(sim, sept_ve_disable=False)) == {
        "sept_ve_disable": ("true", "false")
    }
    assert evaluate(tdx_policy(), tdx_claims(sim, sept_ve_disable=False)).allowed  # not asked


def test_policy_pinning_xfam_denies_a_td_launched_with_other_features(sim: SimulatedPlatform):
    mine, theirs = (0xE7).to_bytes(8, "little"), (0x2E7).to_bytes(8, "little")  # + PT (bit 8)
    policy = tdx_policy(xfam=f'"{mine.hex()}"')
    assert require(policy, tdx_claims(sim, xfam=mine)).allowed
    assert denied(policy, tdx_claims(sim, xfam=theirs)) == {"xfam": (mine.hex(), theirs.hex())}


def test_policy_pinning_td_attributes_denies_other_attributes(sim: SimulatedPlatform):
    attrs = (1 << 28).to_bytes(8, "little")  # SEPT_VE_DISABLE only
    policy = tdx_policy(td_attributes=f'["{attrs.hex()}"]')
    assert require(policy, tdx_claims(sim)).allowed
    assert set(denied(policy, tdx_claims(sim, sept_ve_disable=False))) == {"td_attributes"}


# -- SEV-SNP guest policy bits -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "bit"), [("smt_allowed", SNP_SMT), ("migrate_ma_allowed", SNP_MIGRATE_MA)]
)
def test_policy_forbidding_a_guest_policy_bit_denies_a_vm_launched_with_it(
    sim: SimulatedPlatform, field: str, bit: int
):
    policy = snp_policy(**{field: "false"})
    assert require(policy, snp_claims(sim, policy=SNP_RESERVED_ONE)).allowed
    assert denied(policy, snp_claims(sim, policy=SNP_RESERVED_ONE | bit)) == {
        field: ("false", "true")
    }
    # and true requires the bit
    assert set(denied(snp_policy(**{field: "true"}), snp_claims(sim, policy=SNP_RESERVED_ONE))) == {
        field
    }


def test_snp_debug_guest_policy_is_denied_without_the_insecure_switch(sim: SimulatedPlatform):
    assert "debug" in denied(snp_policy(), snp_claims(sim, debug=True))


@pytest.mark.parametrize(
    ("tee", "field", "value", "message"),
    [
        ("tdx", "sept_ve_disable", '"yes"', 'must be true, false or "any"'),
        ("tdx", "xfam", '"e7"', "expected 8"),
        ("snp", "smt_allowed", "1", 'must be true, false or "any"'),
        ("snp", "sept_ve_disable", "true", "unknown field"),
        ("tdx", "smt_allowed", "false", "unknown field"),
    ],
)
def test_invalid_attribute_fields_are_errors(tee: str, field: str, value: str, message: str):
    with pytest.raises(PolicyError, match=message):
        (tdx_policy if tee == "tdx" else snp_policy)(**{field: value})
