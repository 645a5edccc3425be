"""`shieldml attest verify|explain --tee nvidia-gpu` on the real NVIDIA samples (README times)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shieldml.cli import main

NONCE_E4 = "27a328247bf7935c993341cf587be6f05986ccce4fe7ba2c54100bd616a58f66"
NONCE_E8 = "e97b23a1718095a0e9e35edca810768c70a6a5a389b705e753b197912bc11576"


@pytest.fixture(scope="module")
def nv(vectors: Path) -> Path:
    path = vectors / "attestation" / "nvidia"
    if not path.is_dir():
        pytest.skip("NVIDIA vectors not found under SHIELDML_VECTORS/attestation/nvidia")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().out


def e4(nv: Path) -> list[str]:
    g = nv / "nvat/testdata/sample_attestation_data/gpu"
    return [str(g / "hopperAttestationReport.txt"), "--cert-chain", str(g / "hopperCertChain.txt")]


def test_verify_gpu_report_with_rim_json(nv: Path, capsys: pytest.CaptureFixture[str]):
    rim = nv / "nvtrust/samples/1010_0200_882_96005E0001_PROD.swidtag"
    rc, out = run(capsys, "attest", "verify", "--tee", "nvidia-gpu", *e4(nv), "--rim", str(rim),
                  "--nonce", NONCE_E4, "--at", "2024-06-01T00:00:00Z", "--json")  # fmt: skip
    doc = json.loads(out)
    assert rc == 0 and doc["genuine"] is True and doc["tee"] == "nvidia-gpu"
    assert (doc["driver_version"], doc["vbios_version"]) == ("535.86.09", "96.00.5E.00.01")
    assert doc["measurements_matched"] is True
    assert doc["rim_ids"] == ["NV_GPU_VBIOS_1010_0200_882_96005E0001"]


def test_verify_wrong_nonce_exits_1_naming_the_check(nv: Path, capsys: pytest.CaptureFixture[str]):
    rc, out = run(capsys, "attest", "verify", "--tee", "nvidia-gpu", *e4(nv), "--nonce", "00" * 32,
                  "--at", "2026-12-01T00:00:00Z", "--json")  # fmt: skip
    doc = json.loads(out)
    assert rc == 1 and doc["genuine"] is False and doc["failed_check"] == "nonce"
    assert doc["found"] == NONCE_E4


def test_explain_names_the_mismatched_index(nv: Path, capsys: pytest.CaptureFixture[str]):
    rim = nv / "nvtrust/samples/1010_0200_882_960074001A_PROD.swidtag"
    rc, out = run(capsys, "attest", "explain", "--tee", "nvidia-gpu",
                  str(nv / "trustee/hopper_coco_report1.txt"), "--cert-chain",
                  str(nv / "trustee/hopper_coco_certs1.txt"), "--rim", str(rim),
                  "--at", "2024-06-01T00:00:00Z")  # fmt: skip
    assert rc == 1 and "index 9" in out and "059b32e7" in out and "7f3e9382" in out


def test_verify_serialized_multi_gpu_evidence(nv: Path, capsys: pytest.CaptureFixture[str]):
    f = nv / "nvat/common-test-data/serialized_test_evidence/multi_gpu_hopper.json"
    rc, out = run(capsys, "attest", "explain", "--tee", "nvidia-gpu", str(f), "--nonce", NONCE_E8,
                  "--at", "2026-12-01T00:00:00Z", "--json")  # fmt: skip
    doc = json.loads(out)
    assert rc == 0 and len(doc["gpus"]) == 4
    assert all(g["feature_flag"] == "PPCIE" and g["checks"] for g in doc["gpus"])


def test_gpu_options_are_refused_for_cpu_evidence(nv: Path, capsys: pytest.CaptureFixture[str]):
    rc = main(["attest", "verify", str(nv / "trustee/hopperAttestationReport.txt"), "--rim",
               str(nv / "nvtrust/samples/1010_0200_882_96005E0001_PROD.swidtag")])  # fmt: skip
    assert rc == 2
