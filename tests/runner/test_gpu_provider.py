# ruff: noqa: N802 - a broken NVML keeps pynvml's function names
"""The runner's GPU evidence through NVML, against the simulated NVML (pynvml's function names
and result fields, :mod:`shieldml.testing.simulated_nvml`) backed by simulated GPUs, verified by
the broker's own code."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime

import pytest

from shieldml.attest import verify_gpu_evidence
from shieldml.broker import protocol
from shieldml.broker.server.release import GpuBundle, Settings, verify_session_gpus
from shieldml.errors import AttestationError, EvidenceError, InputReadError
from shieldml.runner.gpu import NvmlGpuProvider
from shieldml.testing.simulated_gpu import SimulatedGpu
from shieldml.testing.simulated_nvml import NVMLError, SimulatedNvml

NOW = datetime(2031, 5, 1, tzinfo=UTC)
REPORT_DATA = hashlib.sha512(b"one session").digest()


@pytest.fixture(scope="module")
def gpus() -> list[SimulatedGpu]:
    return [SimulatedGpu(now=NOW), SimulatedGpu(now=NOW)]


def settings(gpus: list[SimulatedGpu]) -> Settings:
    trust = gpus[0].trust()
    for g in gpus[1:]:
        trust = g.trust(trust)
    return Settings(trust=trust, now=lambda: NOW)


def bundles(items) -> list[GpuBundle]:  # what the broker's HTTP layer makes of the JSON
    out = []
    for d in (i.to_dict() for i in items):
        report = base64.b64decode(d["evidence"]) if "evidence" in d else None
        chain = d["certificate"].encode() if "certificate" in d else None
        out.append(GpuBundle(d["cc_mode"], report, chain))
    return out


def test_every_gpu_answers_its_session_nonce(gpus):
    nv = SimulatedNvml(gpus)
    items = NvmlGpuProvider(nv).collect(REPORT_DATA)
    assert [i.cc_mode for i in items] == ["on", "on"] and nv.started == 0
    assert nv.nonces == [protocol.gpu_nonce(REPORT_DATA, i, 2, "on") for i in range(2)]
    claims = verify_session_gpus(settings(gpus), REPORT_DATA, bundles(items))
    assert [c.cc_mode for c in claims] == ["on", "on"]
    assert len({c.ueid for c in claims}) == 2


def test_gpu_not_in_cc_mode_is_sent_without_a_report_and_refused(gpus):
    items = NvmlGpuProvider(SimulatedNvml(gpus[:1], cc=(0, 0))).collect(REPORT_DATA)
    assert [(i.cc_mode, i.report) for i in items] == [("off", None)]
    with pytest.raises(AttestationError, match="GPU 0 not in confidential-computing mode"):
        verify_session_gpus(settings(gpus), REPORT_DATA, bundles(items))


def test_devtools_mode_is_reported_as_such(gpus):
    (item,) = NvmlGpuProvider(SimulatedNvml(gpus[:1], cc=(1, 1))).collect(REPORT_DATA)
    assert item.cc_mode == "devtools" and item.report is not None
    nonce = protocol.gpu_nonce(REPORT_DATA, 0, 1, "devtools")  # bound as devtools ...
    verify_gpu_evidence(
        item.report, gpus[0].certificates(), now=NOW, trust=gpus[0].trust(), nonce=nonce
    )
    with pytest.raises(AttestationError, match="not in confidential-computing mode"):
        verify_session_gpus(settings(gpus), REPORT_DATA, bundles([item]))  # ... and refused


def test_no_driver_is_an_evidence_error(gpus):
    class Broken(SimulatedNvml):
        def nvmlInit(self) -> None:
            raise NVMLError("Driver Not Loaded")

    with pytest.raises(EvidenceError, match="NVML did not start"):
        NvmlGpuProvider(Broken(gpus)).collect(REPORT_DATA)


MANIFEST = """version = 1
tee = "{tee}"
[command]
argv = ["/usr/bin/python3", "infer.py"]
[[trusted]]
path = "infer.py"
sha256 = "{sha}"
"""


def manifest(tmp_path, tee: str = "snp", gpu: str = ""):
    from shieldml.runner.manifest import JobManifest

    (tmp_path / "infer.py").write_text("print(1)\n")
    sha = hashlib.sha256(b"print(1)\n").hexdigest()
    (tmp_path / "job.toml").write_text(MANIFEST.format(tee=tee, sha=sha) + gpu)
    return JobManifest.load(tmp_path / "job.toml")


def test_manifest_gpu_table_is_measured_and_checked(tmp_path):
    from shieldml.errors import ManifestError

    plain = manifest(tmp_path).workload_digest()
    with_gpu = manifest(tmp_path, gpu='[gpu]\nevidence = "nvml"\n')
    assert with_gpu.gpu is not None and with_gpu.workload_digest() != plain
    same = manifest(tmp_path, gpu='[gpu]\nevidence = "nvml"\ncollateral = "nv/"\n')
    assert same.workload_digest() == with_gpu.workload_digest()  # collateral is not measured
    for bad, match in [
        ('[gpu]\nevidence = "pcie"\n', "must be"),
        ("[gpu]\nrims = []\n", "rims"),
    ]:
        with pytest.raises(ManifestError, match=match):
            manifest(tmp_path, gpu=bad)
    with pytest.raises(ManifestError, match="confidential VM"):
        manifest(tmp_path, tee="simulated", gpu="[gpu]\n")


def test_collateral_directory_is_read_bounded(tmp_path, gpus):
    from shieldml.runner.gpu import gpu_provider_for

    nv = tmp_path / "nv"
    nv.mkdir()
    (nv / "vbios.xml").write_bytes(gpus[0].rim("vbios"))
    (nv / "brom.der").write_bytes(gpus[0].ocsp(1))
    (nv / "notes.txt").write_text("ignored")
    m = manifest(tmp_path, gpu='[gpu]\ncollateral = "nv"\n')
    p = gpu_provider_for(m, lambda _msg: None)
    assert (len(p.rims), len(p.ocsp)) == (1, 1)
    (nv / "huge.der").write_bytes(bytes(600 * 1024))
    with pytest.raises(InputReadError, match="larger than"):
        gpu_provider_for(m, lambda _msg: None)
