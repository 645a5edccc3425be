# ruff: noqa: N802 - NVML's own function names
"""NVIDIA's NVML (the ``pynvml`` module) as far as the runner uses it, backed by simulated GPUs.

:class:`shieldml.runner.gpu.NvmlGpuProvider` takes it in place of ``pynvml``: the same calls,
the same result shapes (ctypes byte arrays with their sizes, the system's confidential-computing
state), answered by :class:`~shieldml.testing.simulated_gpu.SimulatedGpu` objects, so a simulated
run collects GPU evidence through the very code a run on an H100 does. ``cc`` is the system's
confidential-computing state as ``(ccFeature, devToolsMode)``: ``(1, 0)`` on, ``(1, 1)`` the
developer-tools mode, ``(0, 0)`` off (the driver then refuses attestation reports, as NVML does).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from types import SimpleNamespace

from shieldml.testing.simulated_gpu import SimulatedGpu

#: ``[simulated] gpu_cc`` -> NVML's (ccFeature, devToolsMode)
CC_STATES = {"on": (1, 0), "devtools": (1, 1), "off": (0, 0)}
REPORT_BUFFER = 8192  # NVML's attestation report buffer
CHAIN_BUFFER = 5120  # NVML's attestation certificate chain buffer


class NVMLError(Exception):
    """What pynvml raises (its ``NVMLError``)."""


@dataclass
class SimulatedNvml:
    """``pynvml`` for the GPUs ``gpus``; ``nonces`` records every nonce a report was made for."""

    gpus: list[SimulatedGpu]
    cc: tuple[int, int] = (1, 0)
    started: int = 0
    nonces: list[bytes] = field(default_factory=list)

    NVMLError = NVMLError

    def nvmlInit(self) -> None:
        self.started += 1

    def nvmlShutdown(self) -> None:
        if self.started <= 0:
            raise NVMLError("Uninitialized")
        self.started -= 1

    def _live(self) -> None:
        if self.started <= 0:
            raise NVMLError("Uninitialized")

    def nvmlDeviceGetCount(self) -> int:
        self._live()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        self._live()
        if not 0 <= i < len(self.gpus):
            raise NVMLError("Invalid Argument")
        return i

    def nvmlSystemGetConfComputeState(self) -> SimpleNamespace:
        self._live()
        return SimpleNamespace(environment=1, ccFeature=self.cc[0], devToolsMode=self.cc[1])

    def nvmlDeviceGetConfComputeGpuAttestationReport(
        self, handle: int, nonce: bytes
    ) -> SimpleNamespace:
        self._live()
        if self.cc[0] != 1:
            raise NVMLError("Not Supported")
        if len(nonce) != 32:
            raise NVMLError("Invalid Argument")
        self.nonces.append(bytes(nonce))
        raw = self.gpus[handle].report(bytes(nonce))
        buf = (ctypes.c_uint8 * REPORT_BUFFER)(*raw)
        return SimpleNamespace(attestationReportSize=len(raw), attestationReport=buf)

    def nvmlDeviceGetConfComputeGpuCertificate(self, handle: int) -> SimpleNamespace:
        self._live()
        if self.cc[0] != 1:
            raise NVMLError("Not Supported")
        pem = self.gpus[handle].chain_pem()
        buf = (ctypes.c_uint8 * CHAIN_BUFFER)(*pem)
        return SimpleNamespace(attestationCertChainSize=len(pem), attestationCertChain=buf)


__all__ = ["CC_STATES", "NVMLError", "SimulatedNvml"]
