"""NVIDIA GPU evidence for a release: each GPU's SPDM report for this session's nonce, via NVML.

The runner (inside the attested confidential VM) reads the system's confidential-computing
state and, for every GPU NVML enumerates, asks the driver for an attestation report with the
nonce :func:`shieldml.broker.protocol.gpu_nonce` derives from the CPU evidence's report data, the
GPU's index, the GPU count and the CC mode it read; and the GPU's attestation certificate chain.
A GPU outside CC mode gives no report (NVML refuses), and is sent as such: the broker then refuses
with "GPU *i* not in confidential-computing mode". NVML is NVIDIA's ``nvidia-ml-py`` (module
``pynvml``), imported only when a job asks for GPU evidence; tests pass a fake module with the
same functions.

The RIMs and OCSP responses the broker verifies the evidence with are signed by NVIDIA: the
runner passes on what it was given (``rims``, ``ocsp``), unchanged.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shieldml.broker import protocol
from shieldml.errors import EvidenceError, InputReadError, ShieldError

if TYPE_CHECKING:
    from shieldml.runner.manifest import JobManifest

MAX_COLLATERAL_FILE = 512 * 1024
MAX_COLLATERAL_FILES = 64

NVML_CC_SYSTEM_FEATURE_ENABLED = 1
NVML_CC_SYSTEM_DEVTOOLS_MODE_ON = 1


@dataclass(frozen=True)
class GpuEvidenceItem:
    """One GPU's part of a release request (``gpus`` in ``/v1/release``)."""

    cc_mode: str
    report: bytes | None
    chain_pem: bytes | None
    ocsp: tuple[bytes, ...] = ()
    rims: tuple[bytes, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"cc_mode": self.cc_mode}
        if self.report is not None and self.chain_pem is not None:
            d["evidence"] = base64.b64encode(self.report).decode()
            d["certificate"] = self.chain_pem.decode("ascii", errors="replace")
        d["ocsp"] = [base64.b64encode(o).decode() for o in self.ocsp]
        d["rims"] = [r.decode("utf-8", errors="replace") for r in self.rims]
        return d


def _load_nvml() -> Any:
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]
    except ImportError as e:
        raise EvidenceError(
            "GPU evidence needs NVIDIA's NVML bindings",
            hint="pip install nvidia-ml-py (inside the VM image)",
        ) from e
    return pynvml


@dataclass
class NvmlGpuProvider:
    """Collects every GPU's evidence through NVML (``nvml``: the ``pynvml`` module or a fake)."""

    nvml: Any = None
    rims: tuple[bytes, ...] = ()
    ocsp: tuple[bytes, ...] = ()
    log: list[str] = field(default_factory=list)

    def _cc_mode(self, nv: Any) -> str:
        state = nv.nvmlSystemGetConfComputeState()
        if state.ccFeature != NVML_CC_SYSTEM_FEATURE_ENABLED:
            return "off"
        return "devtools" if state.devToolsMode == NVML_CC_SYSTEM_DEVTOOLS_MODE_ON else "on"

    def collect(self, report_data: bytes) -> list[GpuEvidenceItem]:
        """The evidence of every GPU, in NVML's order, for the session of ``report_data``."""
        nv = self.nvml if self.nvml is not None else _load_nvml()
        try:
            nv.nvmlInit()
        except nv.NVMLError as e:
            raise EvidenceError(
                f"NVML did not start: {e}", hint="is the NVIDIA driver loaded?"
            ) from e
        try:
            count = nv.nvmlDeviceGetCount()
            if not 1 <= count <= protocol.MAX_GPUS:
                raise EvidenceError(f"NVML reports {count} GPUs (1 to {protocol.MAX_GPUS} needed)")
            try:
                cc_mode = self._cc_mode(nv)
            except nv.NVMLError as e:  # a driver without CC support
                self.log.append(f"confidential-computing state unavailable: {e}")
                cc_mode = "off"
            out = []
            for i in range(count):
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                nonce = protocol.gpu_nonce(report_data, i, count, cc_mode)
                report = chain = None
                if cc_mode != "off":
                    try:
                        r = nv.nvmlDeviceGetConfComputeGpuAttestationReport(handle, nonce)
                        report = bytes(r.attestationReport[: r.attestationReportSize])
                        c = nv.nvmlDeviceGetConfComputeGpuCertificate(handle)
                        chain = bytes(c.attestationCertChain[: c.attestationCertChainSize])
                    except nv.NVMLError as e:
                        self.log.append(f"GPU {i}: no attestation report: {e}")
                        report = chain = None
                out.append(GpuEvidenceItem(cc_mode, report, chain, self.ocsp, self.rims))
            return out
        finally:
            nv.nvmlShutdown()


def read_collateral(directory: Path) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """``(rims, ocsp)``: the RIMs (``*.xml``, ``*.swidtag``) and DER OCSP responses (``*.der``)
    in ``directory``, each read once and bounded. They are NVIDIA-signed collateral: the broker
    verifies them; nothing here trusts them."""
    try:
        entries = sorted(p for p in directory.iterdir() if p.is_file())
    except OSError as e:
        raise InputReadError(f"{directory}: cannot read GPU collateral: {e.strerror}") from e
    if len(entries) > MAX_COLLATERAL_FILES:
        raise InputReadError(f"{directory}: more than {MAX_COLLATERAL_FILES} collateral files")
    rims: list[bytes] = []
    ocsp: list[bytes] = []
    for p in entries:
        kind = {".xml": rims, ".swidtag": rims, ".der": ocsp}.get(p.suffix.lower())
        if kind is None:
            continue
        with p.open("rb") as f:
            data = f.read(MAX_COLLATERAL_FILE + 1)
        if len(data) > MAX_COLLATERAL_FILE:
            raise InputReadError(f"{p}: larger than {MAX_COLLATERAL_FILE} bytes")
        kind.append(data)
    return tuple(rims), tuple(ocsp)


def gpu_provider_for(m: JobManifest, log: Callable[[str], None]) -> NvmlGpuProvider:
    """The provider a manifest's ``[gpu]`` asks for, with its collateral read (``tee =
    "simulated"``: the simulated platform's GPUs, see :func:`simulated_gpu_provider`)."""
    assert m.gpu is not None
    rims: tuple[bytes, ...] = ()
    ocsp: tuple[bytes, ...] = ()
    if m.gpu.collateral is not None:
        rims, ocsp = read_collateral(m.base / m.gpu.collateral)
    if m.tee == "simulated" and m.simulated.get("gpus") != REAL_GPUS:
        return simulated_gpu_provider(m, log, rims, ocsp)
    if m.tee == "simulated":
        log("simulated CPU TEE with the machine's real GPUs (NVML)")
    log(f"GPU evidence through NVML ({len(rims)} RIMs, {len(ocsp)} OCSP responses)")
    return NvmlGpuProvider(rims=rims, ocsp=ocsp)


#: ``[simulated] gpus`` for the machine's real GPUs beside the simulated CPU TEE: their evidence
#: through the real NVML, verified against NVIDIA's roots (a GPU machine without a CPU TEE)
REAL_GPUS = "nvml"
#: ``[simulated]`` names that describe the simulated GPUs, with their defaults
SIMULATED_GPU = {
    "gpus": "1",
    "gpu_cc": "on",
    "gpu_driver": "550.90.07",
    "gpu_vbios": "96.00.9F.00.01",
}


def simulated_gpu_settings(sim: dict[str, str]) -> dict[str, str]:
    """``[simulated]``'s GPU settings (:data:`SIMULATED_GPU`), checked."""
    from shieldml.policy import version_key
    from shieldml.testing.simulated_nvml import CC_STATES

    got = {k: sim.get(k, v) for k, v in SIMULATED_GPU.items()}
    count = got["gpus"]
    if count == REAL_GPUS:
        extra = sorted(k for k in ("gpu_cc", "gpu_driver", "gpu_vbios") if k in sim)
        if extra:
            raise EvidenceError(
                f'[simulated] {", ".join(extra)}: not with gpus = "{REAL_GPUS}" (real GPUs say '
                "their own state)"
            )
        return got
    if not (count.isascii() and count.isdecimal()) or not 1 <= int(count) <= protocol.MAX_GPUS:
        raise EvidenceError(
            f'[simulated] gpus must be 1 to {protocol.MAX_GPUS} (or "{REAL_GPUS}": the '
            f"machine's real GPUs), not {got['gpus']!r}"
        )
    if got["gpu_cc"] not in CC_STATES:
        raise EvidenceError(f"[simulated] gpu_cc must be one of {', '.join(CC_STATES)}")
    try:
        version_key(got["gpu_driver"])
        parts = version_key(got["gpu_vbios"], vbios=True)
    except ShieldError as e:
        raise EvidenceError(f"[simulated] gpu_driver / gpu_vbios: {e.message}") from None
    if len(parts) != 5 or max(parts) > 0xFF:
        raise EvidenceError("[simulated] gpu_vbios must be five hex bytes (96.00.9F.00.01)")
    return got


def simulated_gpu_provider(
    m: JobManifest,
    log: Callable[[str], None],
    rims: tuple[bytes, ...] = (),
    ocsp: tuple[bytes, ...] = (),
) -> NvmlGpuProvider:
    """NVML answered by the simulated platform's GPUs (never hardware): ``[simulated] gpus``
    of them, in the CC state ``gpu_cc``, reporting ``gpu_driver`` and ``gpu_vbios``. The RIMs
    and OCSP responses are the ``[gpu] collateral`` directory's where it gives them, else what
    the simulated GPUs' own RIM signer and CAs issue now. A broker verifies such evidence only
    with the platform trusted (``--simulated-platform``) and a policy that allows it."""
    from shieldml.testing.simulated import system_clock
    from shieldml.testing.simulated_gpu import open_gpus
    from shieldml.testing.simulated_nvml import CC_STATES, SimulatedNvml

    got = simulated_gpu_settings(m.simulated)
    platform = m.simulated.get("platform")
    if not platform:
        raise EvidenceError('tee = "simulated" needs [simulated] platform = DIR')
    where = Path(platform) if Path(platform).is_absolute() else m.base / platform
    gpus = open_gpus(where, clock=system_clock)[: int(got["gpus"])]
    for g in gpus:
        g.driver_version, g.vbios_version = got["gpu_driver"], got["gpu_vbios"]
    if not rims:
        rims = (gpus[0].rim("driver"), gpus[0].rim("vbios"))
    if not ocsp:
        by_cert: dict[int, bytes] = {}  # the GPUs share their identity CA and ICA
        for g in gpus:
            for i in range(1, len(g.chain) - 1):
                serial = g.chain[i].cert.serial_number
                if serial not in by_cert:
                    by_cert[serial] = g.ocsp(i)
        rim_ocsp = (gpus[0].ocsp(i, rim=True) for i in range(len(gpus[0].rim_chain) - 1))
        ocsp = (*by_cert.values(), *rim_ocsp)
    log(
        f"insecure: {len(gpus)} simulated GPU(s), CC {got['gpu_cc']} "
        f"({len(rims)} RIMs, {len(ocsp)} OCSP responses)"
    )
    return NvmlGpuProvider(SimulatedNvml(gpus, CC_STATES[got["gpu_cc"]]), rims=rims, ocsp=ocsp)
