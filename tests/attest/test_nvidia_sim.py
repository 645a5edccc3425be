"""The simulated GPU through the real verifier: OCSP collateral, RIM comparison, trust roots."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from shieldml.attest._nvidia import verify_gpu_evidence
from shieldml.attest._ocsp import load_responses
from shieldml.attest._trust import RootKind, TrustAnchors
from shieldml.errors import (
    AttestationError,
    CollateralError,
    MeasurementError,
    RevokedError,
    UntrustedRootError,
)
from shieldml.testing.simulated_gpu import SimulatedGpu, responder_key
from tests.conftest import fuzz_examples

NOW = datetime(2031, 5, 1, tzinfo=UTC)
NONCE = bytes(range(32))


@pytest.fixture(scope="module")
def gpu() -> SimulatedGpu:
    return SimulatedGpu(now=NOW)


@pytest.fixture(scope="module")
def rims(gpu: SimulatedGpu) -> list[bytes]:
    return [gpu.rim("vbios"), gpu.rim("driver")]


def run(gpu: SimulatedGpu, **kw: object):
    kw.setdefault("trust", gpu.trust())
    return verify_gpu_evidence(gpu.report(NONCE), gpu.certificates(), now=NOW, nonce=NONCE, **kw)  # type: ignore[arg-type]


def test_simulated_gpu_is_refused_without_its_roots(gpu: SimulatedGpu):
    with pytest.raises(UntrustedRootError, match=r"untrusted root \(simulated\)"):
        run(gpu, trust=TrustAnchors())


def test_simulated_gpu_verifies_with_rims_and_ocsp(gpu: SimulatedGpu, rims: list[bytes]):
    c = run(gpu, rims=rims, ocsp_responses=gpu.ocsp_all())
    assert c.root is RootKind.SIMULATED and c.measurements_matched
    assert [o.status for o in c.ocsp] == ["good"] * 9  # 3 device CAs, 3 per RIM chain
    assert all(o.age_s == 0 and not o.cached for o in c.ocsp)
    assert c.rim_ids == ("NV_GPU_VBIOS_1010_0200_882_96009F0001", "NV_GPU_DRIVER_GH100_550.90.07")


def test_without_ocsp_revocation_is_recorded_as_not_checked(gpu: SimulatedGpu):
    c = run(gpu)
    assert [o.status for o in c.ocsp] == ["not checked"] * 3


@pytest.mark.parametrize(
    ("status", "reason", "match"),
    [
        ("revoked", x509.ReasonFlags.key_compromise, "keyCompromise"),
        ("revoked", x509.ReasonFlags.certificate_hold, "certificateHold"),
    ],
)
def test_revoked_device_ca_is_refused(gpu: SimulatedGpu, status: str, reason: object, match: str):
    bad = gpu.ocsp(2, status=status, reason=reason)  # type: ignore[arg-type]
    with pytest.raises(RevokedError, match=match):
        run(gpu, ocsp_responses=[bad])


def test_unknown_ocsp_status_is_refused(gpu: SimulatedGpu):
    with pytest.raises(AttestationError, match="does not know"):
        run(gpu, ocsp_responses=[gpu.ocsp(1, status="unknown")])


def test_forged_ocsp_response_is_refused(gpu: SimulatedGpu):
    """The host signs a 'good' response for a revoked CA with a key of its own."""
    forged = gpu.ocsp(2, signer=responder_key())
    with pytest.raises(AttestationError, match="not signed by its issuer"):
        run(gpu, ocsp_responses=[forged])


def test_revoked_rim_signer_is_refused(gpu: SimulatedGpu, rims: list[bytes]):
    bad = gpu.ocsp(0, rim=True, status="revoked", reason=x509.ReasonFlags.superseded)
    with pytest.raises(RevokedError, match="HCC RIM L4 Signer"):
        run(gpu, rims=rims, ocsp_responses=[bad])


def test_stale_ocsp_response_is_recorded_as_cached_with_its_age(gpu: SimulatedGpu):
    old = gpu.ocsp(1, produced=NOW - timedelta(days=30), valid_for=timedelta(days=7))
    (brom, *_rest) = run(gpu, ocsp_responses=[old]).ocsp
    assert (brom.status, brom.cached, brom.age_s) == ("good", True, 30 * 86400)


def test_ocsp_response_from_after_the_verification_time_is_refused(gpu: SimulatedGpu):
    future = gpu.ocsp(1, produced=NOW + timedelta(hours=1))
    with pytest.raises(AttestationError, match="after the verification time"):
        run(gpu, ocsp_responses=[future])


def test_measurement_mismatch_names_index_expected_and_found(gpu: SimulatedGpu):
    golden = bytes.fromhex("ab" * 48)
    with pytest.raises(MeasurementError) as e:
        run(gpu, rims=[gpu.rim("vbios", golden={3: golden})])
    (m,) = e.value.mismatches
    assert (m.index, m.expected, m.found) == (3, ("ab" * 48,), gpu.measurements[3].hex())  # type: ignore[attr-defined]
    assert "index 3" in e.value.message


def test_delegated_ocsp_responder_needs_the_ocsp_signing_usage(gpu: SimulatedGpu):
    c = run(gpu, ocsp_responses=[gpu.ocsp(1, delegate="ocsp-signing")])
    assert c.ocsp[0].status == "good"
    with pytest.raises(AttestationError, match="not signed by its issuer"):  # RFC 6960 §4.2.2.2
        run(gpu, ocsp_responses=[gpu.ocsp(1, delegate="no-eku")])


def test_ocsp_response_for_another_certificate_is_not_taken_for_this_one(gpu: SimulatedGpu):
    other = SimulatedGpu(now=NOW)
    c = run(gpu, ocsp_responses=[other.ocsp(1), gpu.ocsp(2)])
    assert [o.status for o in c.ocsp] == ["not checked", "good", "not checked"]


@settings(max_examples=fuzz_examples(50), deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=3))
def test_ocsp_loader_raises_only_collateral_errors(blobs: list[bytes]):
    with contextlib.suppress(CollateralError):
        load_responses(blobs)


def test_device_of_an_unknown_chip_is_refused():
    other = SimulatedGpu(now=NOW, chip="GV100")
    with pytest.raises(AttestationError) as e:
        run(other)
    assert e.value.check == "device" and "GV100 A01 GSP BROM" in (e.value.found or "")


def test_index_35_is_compared_unless_the_signed_report_says_nvdec_is_off():
    golden = {35: bytes.fromhex("cd" * 48)}
    off = SimulatedGpu(now=NOW)  # NVDEC0 disabled (0x55): NVIDIA does not compare index 35
    c = run(off, rims=[off.rim("vbios"), off.rim("driver", golden=golden)])
    assert "index 35 not compared: NVDEC0 disabled" in c.checks[-1].detail
    on = SimulatedGpu(now=NOW, nvdec0=0xAA)
    with pytest.raises(MeasurementError) as e:
        run(on, rims=[on.rim("vbios"), on.rim("driver", golden=golden)])
    assert [m.index for m in e.value.mismatches] == [35]  # type: ignore[attr-defined]


# -- the kept family of a simulated platform (what `shieldml run` and `broker serve` share) ------
def test_kept_family_is_one_make_and_verifies_after_reloading(tmp_path):
    from shieldml.testing.simulated_gpu import KEPT_GPUS, open_gpus

    made = open_gpus(tmp_path, clock=lambda: NOW)
    again = open_gpus(tmp_path, clock=lambda: NOW + timedelta(days=30))
    assert len(made) == len(again) == KEPT_GPUS
    assert [g.certificates() for g in made] == [g.certificates() for g in again]
    assert len({g.chain[0].cert.serial_number for g in again}) == KEPT_GPUS  # one leaf each
    assert len({g.root for g in again}) == len({g.rim_root for g in again}) == 1
    g = again[3]
    later = NOW + timedelta(days=30)
    c = verify_gpu_evidence(
        g.report(NONCE), g.certificates(), now=later, nonce=NONCE, trust=again[0].trust(),
        rims=[g.rim("vbios"), g.rim("driver")], ocsp_responses=g.ocsp_all(),
    )  # fmt: skip
    assert c.measurements_matched and c.ueid == str(g.chain[0].cert.serial_number)
    assert (tmp_path / "gpus.json").stat().st_mode & 0o077 == 0  # private keys: owner only


def test_processes_making_the_family_at_once_all_get_the_same_one(tmp_path):
    from shieldml.testing.simulated_gpu import open_gpus
    from tests.threads import at_once

    got = at_once([lambda: open_gpus(tmp_path, clock=lambda: NOW) for _ in range(4)])
    serials = [[g.chain[0].cert.serial_number for g in r] for r in got]  # type: ignore[union-attr]
    assert all(s == serials[0] for s in serials)
    assert [p.name for p in tmp_path.iterdir()] == ["gpus.json"]  # no temporary file left


def test_kept_family_outside_its_validity_is_refused(tmp_path):
    from shieldml.errors import ExpiredError
    from shieldml.testing.simulated_gpu import open_gpus

    open_gpus(tmp_path, clock=lambda: NOW)
    with pytest.raises(ExpiredError, match="the clock reads 2041") as e:
        open_gpus(tmp_path, clock=lambda: NOW + timedelta(days=3651))
    assert e.value.hint is not None and "gpus.json" in e.value.hint
    with pytest.raises(ExpiredError):
        open_gpus(tmp_path, clock=lambda: NOW - timedelta(days=2))


def test_a_damaged_family_file_is_a_format_error(tmp_path):
    from shieldml.errors import FormatError
    from shieldml.testing.simulated_gpu import open_gpus

    (tmp_path / "gpus.json").write_text('{"gpus": [{"chip": "GH100"}]}')
    with pytest.raises(FormatError, match="not a kept simulated GPU"):
        open_gpus(tmp_path, clock=lambda: NOW)
    (tmp_path / "gpus.json").write_text("[")
    with pytest.raises(FormatError, match="not a kept simulated GPU family"):
        open_gpus(tmp_path, clock=lambda: NOW)


def test_a_read_only_platform_without_gpus_is_an_input_error_and_a_broker_still_serves(
    tmp_path, monkeypatch, caplog
):
    """A simulated platform directory the broker may only read (mounted read-only, say) holds no
    GPU family: the broker still trusts the platform's CPU roots, and says why not GPUs'."""
    import tempfile

    from shieldml.attest import fingerprint
    from shieldml.broker.server.config import BrokerConfig
    from shieldml.errors import InputReadError
    from shieldml.testing.simulated import SimulatedPlatform, system_clock
    from shieldml.testing.simulated_gpu import open_gpus

    d = tmp_path / "ro"
    plat = SimulatedPlatform.open(d, clock=system_clock)

    def read_only(*_a: object, **_k: object) -> tuple[int, str]:
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(InputReadError, match="cannot keep simulated GPUs there: Read-only"):
        open_gpus(d, clock=system_clock)
    cfg = BrokerConfig(database="sqlite://", state_dir=str(tmp_path), simulated_platforms=(str(d),))
    with caplog.at_level("WARNING"):
        anchors = cfg.trust()
    assert "no simulated GPUs trusted" in caplog.text
    assert fingerprint(plat.intel_root) in anchors.simulated
    assert not (d / "gpus.json").exists()  # and so no simulated GPU root is trusted
    assert anchors.simulated == plat.trust().simulated
