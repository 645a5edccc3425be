"""``min_tcb_evaluation_data_number``: a policy can refuse Intel collateral older than a TCB
recovery it knows of (stale but validly signed collateral that still calls the platform current)."""

from __future__ import annotations

import pytest

from shieldml.attest import Claims
from shieldml.errors import PolicyDenied, PolicyError
from shieldml.policy import Policy, evaluate, require

MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"


def _policy(extra: str = "", tee: str = "sgx") -> str:
    if tee == "snp":
        refs = 'measurement = "' + "9a" * 48 + '"\nhost_data = "' + "00" * 32 + '"\n'
        refs += "min_reported_tcb = {snp = 0}\nvmpl = 0\n"
    else:
        refs = f'mrenclave = ["{MRENCLAVE}"]\nmrsigner = "any"\nisv_prod_id = 0\nmin_isv_svn = 0\n'
        refs += 'tcb_status = ["ConfigurationAndSWHardeningNeeded"]\nadvisory_ids = "any"\n'
    return f'[[profile]]\ntee = "{tee}"\n{refs}workload_digest = "any"\n{extra}'


def test_claims_carry_the_collaterals_evaluation_number(sgx_claims: Claims):
    assert sgx_claims.tcb_evaluation_data_number == 17
    assert sgx_claims.to_dict()["tcb_evaluation_data_number"] == 17


def test_collateral_older_than_the_policys_min_tcb_evaluation_data_number_is_denied(
    sgx_claims: Claims,
):
    """The attack: the host offers stale, validly signed collateral (evaluation 17) after Intel's
    TCB recovery 18; the owner's policy names 18 as the oldest it accepts."""
    with pytest.raises(PolicyDenied) as e:
        require(Policy.from_toml(_policy("min_tcb_evaluation_data_number = 18\n")), sgx_claims)
    assert e.value.verdict is not None
    (failure,) = e.value.verdict.failures()
    assert "min_tcb_evaluation_data_number: expected >= 18, found 17" in failure
    assert "fresh collateral" in failure


def test_collateral_at_the_minimum_is_accepted(sgx_claims: Claims):
    v = require(Policy.from_toml(_policy("min_tcb_evaluation_data_number = 17\n")), sgx_claims)
    names = [c.name for c in v.profiles[0].checks]
    assert "min_tcb_evaluation_data_number" in names
    unset = evaluate(Policy.from_toml(_policy()), sgx_claims)
    assert "min_tcb_evaluation_data_number" not in [c.name for c in unset.profiles[0].checks]


@pytest.mark.parametrize("value", ["-1", "true", '"18"', "1.5"])
def test_min_tcb_evaluation_data_number_must_be_a_non_negative_integer(value: str):
    with pytest.raises(PolicyError, match="non-negative integer"):
        Policy.from_toml(_policy(f"min_tcb_evaluation_data_number = {value}\n"))


def test_min_tcb_evaluation_data_number_is_for_intel_profiles_only():
    with pytest.raises(PolicyError, match=r"unknown field.*min_tcb_evaluation_data_number"):
        Policy.from_toml(
            _policy(
                "min_tcb_evaluation_data_number = 1\ninsecure_allow_out_of_date = true\n", "snp"
            )
        )
    Policy.from_toml(_policy(tee="snp"))  # the same profile without it is valid
