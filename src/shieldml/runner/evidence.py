"""Where the runner's evidence comes from: real TEE interfaces, or the simulated platform.

- ``tdx`` / ``snp``: Linux configfs-tsm (``/sys/kernel/config/tsm/report``): make an entry, write
  the 64-byte report data to ``inblob``, read ``outblob`` (and, for SEV-SNP, the certificate
  table from ``auxblob``), remove the entry.
- ``gramine``: Gramine's ``/dev/attestation``: write ``user_report_data``, read ``quote``.
- ``simulated``: :class:`shieldml.testing.simulated.SimulatedPlatform` (tests and the demo only; a
  broker accepts it only with its simulated root trusted and the policy's insecure switch).
- ``auto``: Gramine if ``/dev/attestation/quote`` exists, else configfs-tsm if present.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from shieldml.attest import TeeKind
from shieldml.errors import EvidenceError

TSM_ROOT = Path("/sys/kernel/config/tsm/report")
GRAMINE_ROOT = Path("/dev/attestation")
READ_TIMEOUT = 30.0


@dataclass(frozen=True)
class Evidence:
    tee: str  # what the broker's `tee` field gets: sgx, tdx, snp (or auto)
    data: bytes
    collateral: dict[str, Any] | None = None
    vcek: bytes | None = None  # VCEK, or the SEV-SNP certificate table
    cert_chain: str | None = None


class Provider(Protocol):
    name: str

    def evidence(self, report_data: bytes) -> Evidence: ...


def _read_nonempty(path: Path, timeout: float) -> bytes:
    """Read a generated blob; configfs produces it on read, a test double may need a moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        if data or time.monotonic() > deadline:
            return data
        time.sleep(0.01)


class ConfigfsTsmProvider:
    """TDX and SEV-SNP guests through configfs-tsm."""

    name = "configfs-tsm"

    def __init__(self, root: Path = TSM_ROOT, timeout: float = READ_TIMEOUT) -> None:
        self.root = root
        self.timeout = timeout

    def evidence(self, report_data: bytes) -> Evidence:
        entry = self.root / f"shieldml-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            entry.mkdir()
        except OSError as e:
            raise EvidenceError(
                f"{self.root}: cannot create a report entry: {e.strerror}",
                hint="is this a TDX or SEV-SNP guest with configfs-tsm mounted?",
            ) from e
        try:
            (entry / "inblob").write_bytes(report_data)
            out = _read_nonempty(entry / "outblob", self.timeout)
            provider = (
                _read_nonempty(entry / "provider", self.timeout).decode(errors="replace").strip()
            )
            aux = (entry / "auxblob").read_bytes() if (entry / "auxblob").exists() else b""
        except OSError as e:
            raise EvidenceError(f"{entry}: reading the report failed: {e.strerror}") from e
        finally:
            _remove(entry)
        if not out:
            raise EvidenceError(f"{entry}: the TEE returned no report")
        if provider.startswith("tdx"):
            return Evidence("tdx", out)
        if provider.startswith("sev"):
            return Evidence("snp", out, vcek=aux or None)
        raise EvidenceError(f"unknown configfs-tsm provider {provider!r}")


def _remove(entry: Path) -> None:
    # configfs removes an entry with rmdir alone; a plain directory (a test double) needs its files gone
    try:
        entry.rmdir()
    except OSError:
        for f in entry.iterdir():
            with contextlib.suppress(OSError):
                f.unlink()
        with contextlib.suppress(OSError):
            entry.rmdir()


class GramineProvider:
    """SGX enclaves under Gramine (``/dev/attestation``)."""

    name = "gramine"

    def __init__(self, root: Path = GRAMINE_ROOT, timeout: float = READ_TIMEOUT) -> None:
        self.root = root
        self.timeout = timeout

    def evidence(self, report_data: bytes) -> Evidence:
        try:
            (self.root / "user_report_data").write_bytes(report_data)
        except OSError as e:
            raise EvidenceError(
                f"{self.root}: cannot write user_report_data: {e.strerror}",
                hint='run inside Gramine with sgx.remote_attestation = "dcap"',
            ) from e
        quote = _read_nonempty(self.root / "quote", self.timeout)
        if not quote:
            raise EvidenceError(f"{self.root}/quote: no quote")
        return Evidence("sgx", quote)


class SimulatedProvider:
    """The simulated platform kept in ``platform_dir`` (never real hardware)."""

    name = "simulated"

    def __init__(
        self,
        platform_dir: str | os.PathLike[str],
        kind: str = "sgx",
        measurements: dict[str, str] | None = None,
        debug: bool = False,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        from shieldml.testing.simulated import SimulatedPlatform, system_clock

        self.platform = SimulatedPlatform.open(platform_dir, clock=clock or system_clock)
        if kind not in tuple(TeeKind):
            *first, last = (k.value for k in TeeKind)
            raise EvidenceError(
                f"simulated TEE kind must be {', '.join(first)} or {last}, not {kind!r}"
            )
        self.kind = kind
        self.m = {
            k: bytes.fromhex(v)
            for k, v in (measurements or {}).items()
            if k not in ("kind", "platform", "debug")
        }
        self.debug = debug

    def evidence(self, report_data: bytes) -> Evidence:
        p, m = self.platform, self.m
        if self.kind == "snp":
            report, _vcek, _chain = p.snp_report(
                report_data=report_data,
                measurement=m.get("measurement", bytes(48)),
                host_data=m.get("host_data", bytes(32)),
                debug=self.debug,
            )
            return Evidence("snp", report, vcek=p.snp_cert_table())
        if self.kind == "tdx":
            quote, col = p.tdx_quote(
                report_data=report_data, mrtd=m.get("mrtd", bytes(48)), debug=self.debug
            )
        else:
            quote, col = p.sgx_quote(
                report_data=report_data,
                mrenclave=m.get("mrenclave", bytes(32)),
                mrsigner=m.get("mrsigner", bytes(32)),
                debug=self.debug,
            )
        return Evidence(self.kind, quote, collateral=json.loads(col.to_json()))


def provider_for(
    tee: str, simulated: dict[str, str] | None = None, *, base: Path | None = None
) -> Provider:
    """The provider a manifest's ``tee`` asks for (``auto``: what this machine has)."""
    sim = dict(simulated or {})
    if tee == "simulated":
        platform = sim.get("platform")
        if not platform:
            raise EvidenceError('tee = "simulated" needs [simulated] platform = DIR')
        path = Path(platform) if Path(platform).is_absolute() or base is None else base / platform
        return SimulatedProvider(
            path, sim.get("kind", "sgx"), sim, sim.get("debug", "false") == "true"
        )
    if tee in (TeeKind.TDX, TeeKind.SNP):  # the guests configfs-tsm serves
        return ConfigfsTsmProvider()
    if tee == "gramine":
        return GramineProvider()
    if (GRAMINE_ROOT / "quote").exists():
        return GramineProvider()
    if TSM_ROOT.is_dir():
        return ConfigfsTsmProvider()
    raise EvidenceError(
        "no TEE found (neither /dev/attestation nor configfs-tsm)",
        hint='on a machine without a TEE, tests and demos use tee = "simulated"',
    )
