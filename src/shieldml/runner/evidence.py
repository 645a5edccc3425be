"""Where the runner's evidence comes from: real TEE interfaces, or the simulated platform.

- ``tdx`` / ``snp``: Linux configfs-tsm (``/sys/kernel/config/tsm/report``): make an entry, write
  the 64-byte report data to ``inblob``, read ``outblob`` (and, for SEV-SNP, the certificate
  table from ``auxblob``), remove the entry.
- ``gramine``: Gramine's ``/dev/attestation``: write ``user_report_data``, read ``quote``.
- ``simulated``: :class:`shieldml.testing.simulated.SimulatedPlatform` (tests and the demo only; a
  broker accepts it only with its simulated root trusted and the policy's insecure switch).
- ``auto``: Gramine if ``/dev/attestation/quote`` exists, else configfs-tsm if present.

On TDX the workload digest is also *measured*, not only claimed in report data: before the run's
first evidence, :meth:`ConfigfsTsmProvider.bind_workload` extends one RTMR (``[tdx] rtmr``, 3 by
default) through the kernel's ``tdx_guest`` measurement files (Linux 6.16+:
``/sys/class/misc/tdx_guest/measurements/rtmr3:sha384``; a 48-byte write at offset 0 extends the
register, a read returns its value) with :func:`rtmr_extend_value` of the digest, once per run.
The TDX module computes ``RTMR = SHA-384(RTMR || value)`` (:func:`rtmr_after`), so an owner
computes the value to pin with :func:`expected_rtmr`. Each quote the provider then obtains must
show that value, or the run stops. Where the interface is missing the run goes on with a note
(policies cannot pin the RTMR to the job then) unless the manifest says ``extend = "required"``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
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
TDX_MEASUREMENTS = Path("/sys/class/misc/tdx_guest/measurements")
READ_TIMEOUT = 30.0
RTMR_DOMAIN = b"shieldml/v1 workload rtmr\0"
RTMR_SIZE = 48
EXTEND_MODES = ("if-available", "required", "off")


def rtmr_extend_value(workload_digest: str) -> bytes:
    """The 48 bytes the runner writes to extend an RTMR with a workload digest:
    ``SHA-384(b"shieldml/v1 workload rtmr\\0" || workload_digest)``, the digest as its ASCII
    text (``sha256:`` + 64 hex digits)."""
    return hashlib.sha384(RTMR_DOMAIN + workload_digest.encode("ascii")).digest()


def rtmr_after(before: bytes, *values: bytes) -> bytes:
    """An RTMR after extending it with each 48-byte value in turn: ``SHA-384(rtmr || value)``."""
    if len(before) != RTMR_SIZE or any(len(v) != RTMR_SIZE for v in values):
        raise ValueError("an RTMR and each value extended into it are 48 bytes")
    for v in values:
        before = hashlib.sha384(before + v).digest()
    return before


def expected_rtmr(workload_digest: str, before: bytes = bytes(RTMR_SIZE)) -> bytes:
    """The RTMR value a policy pins for a job: the register after the runner extended it once with
    ``workload_digest``, from its value ``before`` the run (all zeros when nothing in the VM's
    boot extends that RTMR; otherwise its value on a reference boot of the image)."""
    return rtmr_after(before, rtmr_extend_value(workload_digest))


@dataclass(frozen=True)
class WorkloadExtension:
    """What a run did to measure its workload digest into an RTMR (logged, and in the receipt)."""

    rtmr: int
    value: bytes  # rtmr_extend_value(digest): what was (or would have been) written
    extended: bool
    before: bytes | None = None
    after: bytes | None = None  # SHA-384(before || value): what every later quote must show
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "rtmr": self.rtmr,
            "extended": self.extended,
            "value": self.value.hex(),
            "before": self.before.hex() if self.before is not None else None,
            "after": self.after.hex() if self.after is not None else None,
            "note": self.note,
        }

    def describe(self) -> str:
        if self.extended and self.after is not None:
            return f"RTMR{self.rtmr} extended with the workload digest: now {self.after.hex()}"
        return self.note


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

    def bind_workload(self, workload_digest: str) -> WorkloadExtension | None:
        """Measure the workload digest into the TEE where it can (once per run, before the first
        evidence); None where the TEE has nothing to extend (SGX measures into MRENCLAVE)."""
        ...


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


def _read_register(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _write_register(path: Path, value: bytes) -> None:
    """One write of the whole value at offset 0 (the kernel refuses partial writes)."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.write(fd, value) != len(value):
            raise OSError(errno.EIO, "short write")
    finally:
        os.close(fd)


class ConfigfsTsmProvider:
    """TDX and SEV-SNP guests through configfs-tsm; on TDX the workload digest goes into an RTMR.

    ``extend``: ``"if-available"`` (default), ``"required"`` (refuse to run without it), ``"off"``,
    or None where no RTMR applies (an SEV-SNP job).
    """

    name = "configfs-tsm"

    def __init__(
        self,
        root: Path = TSM_ROOT,
        timeout: float = READ_TIMEOUT,
        *,
        measurements: Path = TDX_MEASUREMENTS,
        rtmr: int = 3,
        extend: str | None = "if-available",
    ) -> None:
        if extend is not None and extend not in EXTEND_MODES:
            raise EvidenceError(f"RTMR extension must be one of {', '.join(EXTEND_MODES)}")
        self.root = root
        self.timeout = timeout
        self.measurements = measurements
        self.rtmr = rtmr
        self.extend = extend
        self.binding: WorkloadExtension | None = None
        self._bound: str | None = None

    def bind_workload(self, workload_digest: str) -> WorkloadExtension | None:
        """Extend ``rtmr`` with the workload digest (once: a second call for the same digest
        returns the first record; another digest is refused)."""
        if self._bound is not None:
            if workload_digest != self._bound:
                raise EvidenceError(
                    f"RTMR{self.rtmr} was already extended with {self._bound} in this run",
                    hint="one run measures one workload",
                )
            return self.binding
        self.binding = self._extend(workload_digest)  # raises before anything is recorded
        self._bound = workload_digest
        return self.binding

    def _extend(self, workload_digest: str) -> WorkloadExtension | None:
        if self.extend is None:
            return None
        n, value = self.rtmr, rtmr_extend_value(workload_digest)
        if self.extend == "off":
            return WorkloadExtension(
                n, value, False, note=f'RTMR{n} not extended ([tdx] extend = "off")'
            )
        path = self.measurements / f"rtmr{n}:sha384"

        def unavailable(reason: str) -> WorkloadExtension:
            if self.extend == "required":
                raise EvidenceError(
                    f"{path}: cannot extend RTMR{n} with the workload digest: {reason}",
                    hint='the job manifest requires it ([tdx] extend = "required"): run in a TDX '
                    "guest with Linux 6.16 or later (tdx_guest measurements in sysfs), as root, "
                    "with that file writable",
                )
            return WorkloadExtension(
                n,
                value,
                False,
                note=f"RTMR{n} not extended ({reason}); a policy cannot pin RTMR{n} to this job",
            )

        try:
            before = _read_register(path)
        except FileNotFoundError:
            return unavailable("the kernel offers no TDX RTMR extension here")
        except OSError as e:
            return unavailable(f"reading it failed: {e.strerror or e}")
        if len(before) != RTMR_SIZE:
            return unavailable(f"it reads {len(before)} bytes, not {RTMR_SIZE}")
        try:
            _write_register(path, value)
        except OSError as e:
            return unavailable(f"writing it failed: {e.strerror or e}")
        return WorkloadExtension(n, value, True, before, rtmr_after(before, value))

    def _check_rtmr(self, quote: bytes) -> None:
        """A quote obtained after the extension must carry the extended RTMR."""
        b = self.binding
        if b is None or not b.extended or b.after is None:
            return
        from shieldml.attest import Quote, TdReportBody
        from shieldml.errors import FormatError

        try:
            q = Quote.from_bytes(quote)
        except FormatError as e:
            raise EvidenceError(f"the TEE returned a quote that does not parse: {e}") from e
        if not isinstance(q.body, TdReportBody):
            raise EvidenceError("the TEE returned an SGX quote where a TD quote was expected")
        found: bytes = q.body.rtmrs[b.rtmr]
        if found != b.after:
            raise EvidenceError(
                f"the quote's RTMR{b.rtmr} is {found.hex()}, not {b.after.hex()} (its value "
                f"{b.before.hex() if b.before else '?'} extended with the workload digest)",
                hint="something else extended this RTMR during the run: nothing but the job may "
                "run in the VM (docs/deploy-confidential-vms.md)",
            )

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
            self._check_rtmr(out)
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

    def bind_workload(self, workload_digest: str) -> WorkloadExtension | None:  # noqa: ARG002
        return None  # the enclave's manifest, and so the job, is measured into MRENCLAVE

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


def simulated_snp_tcb() -> dict[str, int]:
    """The reported TCB (bl, tee, snp, ucode) of :class:`SimulatedProvider`'s SEV-SNP reports."""
    from shieldml.testing.simulated import SNP_TCB

    return dict(SNP_TCB)


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
        *,
        rtmr: int = 3,
        extend: str = "if-available",
    ) -> None:
        from shieldml.testing.simulated import SimulatedPlatform, system_clock

        self.platform = SimulatedPlatform.open(platform_dir, clock=clock or system_clock)
        if kind not in tuple(TeeKind):
            *first, last = (k.value for k in TeeKind)
            raise EvidenceError(
                f"simulated TEE kind must be {', '.join(first)} or {last}, not {kind!r}"
            )
        if extend not in EXTEND_MODES:
            raise EvidenceError(f"RTMR extension must be one of {', '.join(EXTEND_MODES)}")
        self.kind = kind
        self.m = {
            k: bytes.fromhex(v)
            for k, v in (measurements or {}).items()
            if k not in ("kind", "platform", "debug") and not k.startswith("gpu")
        }
        self.debug = debug
        # the simulated TD's RTMRs as they stand: [simulated] rtmr0..rtmr3 at "boot"
        self.rtmrs = [self.m.get(f"rtmr{i}", bytes(RTMR_SIZE)) for i in range(4)]
        self.rtmr, self.extend = rtmr, extend
        self.binding: WorkloadExtension | None = None
        self._bound: str | None = None

    def bind_workload(self, workload_digest: str) -> WorkloadExtension | None:
        """As on a TDX guest with the kernel interface: the simulated TD's RTMR is extended."""
        if self._bound is not None:
            if workload_digest != self._bound:
                raise EvidenceError(f"RTMR{self.rtmr} was already extended with {self._bound}")
            return self.binding
        self._bound = workload_digest
        n, value = self.rtmr, rtmr_extend_value(workload_digest)
        if self.kind != "tdx":
            if self.extend == "required":
                raise EvidenceError(f"a simulated {self.kind} TEE has no RTMR{n} to extend")
            return None
        if self.extend == "off":
            self.binding = WorkloadExtension(
                n, value, False, note=f'RTMR{n} not extended ([tdx] extend = "off")'
            )
            return self.binding
        before = self.rtmrs[n]
        self.rtmrs[n] = rtmr_after(before, value)
        self.binding = WorkloadExtension(n, value, True, before, self.rtmrs[n])
        return self.binding

    def evidence(self, report_data: bytes) -> Evidence:
        p, m = self.platform, self.m
        if self.kind == "snp":
            report, _vcek, _chain = p.snp_report(
                report_data=report_data,
                measurement=m.get("measurement", bytes(48)),
                host_data=m.get("host_data", bytes(32)),
                id_key_digest=m.get("id_key_digest", bytes(48)),
                author_key_digest=m.get("author_key_digest", bytes(48)),
                debug=self.debug,
            )
            return Evidence("snp", report, vcek=p.snp_cert_table())
        if self.kind == "tdx":
            r0, r1, r2, r3 = self.rtmrs
            quote, col = p.tdx_quote(
                report_data=report_data,
                mrtd=m.get("mrtd", bytes(48)),
                rtmrs=(r0, r1, r2, r3),
                mr_config_id=m.get("mr_config_id", bytes(48)),
                mr_owner=m.get("mr_owner", bytes(48)),
                mr_owner_config=m.get("mr_owner_config", bytes(48)),
                debug=self.debug,
            )
        else:
            quote, col = p.sgx_quote(
                report_data=report_data,
                mrenclave=m.get("mrenclave", bytes(32)),
                mrsigner=m.get("mrsigner", bytes(32)),
                debug=self.debug,
            )
        return Evidence(self.kind, quote, collateral=json.loads(col.to_json()))


def machine_tee() -> str | None:
    """What ``tee = "auto"`` finds on this machine: ``"gramine"``, ``"configfs-tsm"`` (TDX or
    SEV-SNP), or ``None`` (no TEE: a laptop, say)."""
    if (GRAMINE_ROOT / "quote").exists():
        return "gramine"
    if TSM_ROOT.is_dir():
        return "configfs-tsm"
    return None


def provider_for(
    tee: str,
    simulated: dict[str, str] | None = None,
    *,
    base: Path | None = None,
    rtmr: int = 3,
    extend: str = "if-available",
) -> Provider:
    """The provider a manifest's ``tee`` asks for (``auto``: what this machine has); ``rtmr`` and
    ``extend`` are the manifest's ``[tdx]`` settings."""
    sim = dict(simulated or {})
    if tee == "simulated":
        platform = sim.get("platform")
        if not platform:
            raise EvidenceError('tee = "simulated" needs [simulated] platform = DIR')
        path = Path(platform) if Path(platform).is_absolute() or base is None else base / platform
        return SimulatedProvider(
            path,
            sim.get("kind", "sgx"),
            sim,
            sim.get("debug", "false") == "true",
            rtmr=rtmr,
            extend=extend,
        )
    if tee == TeeKind.TDX:  # the guest's configfs-tsm serves TDX and SEV-SNP
        return ConfigfsTsmProvider(rtmr=rtmr, extend=extend)
    if tee == TeeKind.SNP:
        return ConfigfsTsmProvider(extend=None)
    if tee in (TeeKind.SGX, "gramine"):  # Gramine is how a job runs in SGX ("gramine": old name)
        return GramineProvider()
    if (GRAMINE_ROOT / "quote").exists():
        return GramineProvider()
    if TSM_ROOT.is_dir():
        return ConfigfsTsmProvider(rtmr=rtmr, extend=extend)
    raise EvidenceError(
        "no TEE found (neither /dev/attestation nor configfs-tsm)",
        hint='on a machine without a TEE, tests and demos use tee = "simulated"',
    )
