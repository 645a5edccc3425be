"""NVIDIA's nv-local-gpu-verifier 2.7.3 as an offline test oracle: one JSON line per case.

Runs inside its own virtual environment (``make nv-oracle`` builds ``.venv-nvoracle``; its pins,
cryptography 43.0.1, signxml 3.2.0, pyOpenSSL 24.2.1, ..., conflict with shieldml's), never in
shieldml's. It drives the verifier's own classes on a saved report, chain and RIM files:

    .venv-nvoracle/bin/python scripts/nv_oracle.py --report R.txt --chain C.txt \\
        --vbios-rim V.swidtag [--driver-rim D.xml] --nonce HEX --time 2024-06-01T00:00:00Z [--runs 5]
    .venv-nvoracle/bin/python scripts/nv_oracle.py --batch cases.json   # a list of the same, as objects

What is changed in the verifier's process to make that possible (nothing in its files):

* **OCSP** is pinned: ``CcAdminUtils.ocsp_certificate_chain_validation`` (which always sends an
  HTTP request, and whose answer must be signed by NVIDIA's OCSP responder, so no local mock can
  answer it) is replaced by one that makes no call and answers "good, not revoked" for every
  chain it is asked about; the chains it was asked about are listed under ``ocsp.asked``. No OCSP
  response is in the vectors, so revocation is not tested through the oracle.
* **The clock** is pinned to ``--time``: every pyOpenSSL ``X509Store`` the verifier builds (device
  chain, RIM chains: ``OpenSSL.crypto.X509Store``) and the store signxml 3.2.0 takes from
  ``SSL.Context.get_cert_store`` for the RIM signature get ``set_time(time)``. Nothing else in the
  checks run here reads the wall clock (its claims/JWT code does, and is not run).
* **RIMs** are read from the given files (``RIM(rim_path=...)``), never fetched; the RIM and OCSP
  HTTP calls and ``urllib.request.urlopen`` raise, so a missed patch fails loudly, offline.
* **No NVML/GPU**: the evidence goes straight into ``AttestationReport`` and
  ``GpuCertificateChains(TestHandle(pem))`` (which, as for a real GPU, replaces the chain's last
  certificate with the package's pinned device root).

The checks are NVIDIA's functions, called in ``cc_admin.attest``'s order, but each one is run even
when an earlier one failed, so every verdict is reported, ``first_failure`` names the one
``attest`` would have stopped at. Driver and VBIOS versions are the report's own (what NVML says on
a real GPU), so ``verify_attestation_report``'s version checks always pass; the nonce and the
signature are reported separately (the signature with the report's own nonce when the given one
differs). The measurement comparison is ``Verifier.verify`` on every RIM that parsed, whether or
not its verification passed (as upstream tests do with RIM signature checking off); with only
one RIM, the other is an empty stand-in. Its mismatching indices are read from its log lines.
``verdict`` is true when every check that ran passed (with one RIM, NVIDIA's own ``attest`` would
also fail for the missing one). NVSwitch evidence is out of scope: that verifier is in
``nv-attestation-sdk``, not in this package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_PINNED: list[datetime] = [datetime(2000, 1, 1, tzinfo=UTC)]  # the verification time in force
_ASKED: list[str] = []  # the OCSP questions the pinned answer replaced
_MISMATCH_LINE = re.compile(r"^\s*(\d+) \[(Driver|Firmware)\]\s*$")


class _NoRim:
    """The RIM ``Verifier`` wants when only the other one was given: no measurements."""

    @staticmethod
    def get_measurements() -> dict[int, Any]:
        return {}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _offline(*_a: object, **_k: object) -> object:
    raise RuntimeError("nv_oracle: network access attempted (a patch was missed)")


def _install_patches() -> dict[str, Any]:
    """Import the verifier (from a scratch cwd: it writes ./verifier.log) and pin OCSP, clock,
    network; returns the modules the cases use."""
    warnings.simplefilter("ignore")
    scratch = tempfile.mkdtemp(prefix="nv-oracle-")
    here = Path.cwd()
    os.chdir(scratch)
    try:
        import urllib.request

        from OpenSSL import SSL, crypto
        from verifier import cc_admin_utils, config, rim, verifier
        from verifier.attestation import AttestationReport
        from verifier.nvml.gpu_cert_chains import GpuCertificateChains
        from verifier.nvml.test_handle import TestHandle
    finally:
        os.chdir(here)
    for log in (config.info_log, config.event_log):  # quiet: stdout carries only the JSON
        for h in list(log.handlers):
            log.removeHandler(h)
            h.close()
        log.addHandler(logging.NullHandler())
        log.propagate = False
    with contextlib.suppress(OSError):
        (Path(scratch) / "verifier.log").unlink()
        Path(scratch).rmdir()

    base_store = crypto.X509Store

    class PinnedStore(base_store):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.set_time(_PINNED[0])

    crypto.X509Store = PinnedStore  # cc_admin_utils calls crypto.X509Store() at check time
    get_store = SSL.Context.get_cert_store

    def pinned_get_cert_store(self: Any) -> Any:  # signxml's RIM-signature chain store
        store = get_store(self)
        if store is not None:
            store.set_time(_PINNED[0])
        return store

    SSL.Context.get_cert_store = pinned_get_cert_store  # type: ignore[method-assign]

    utils = cc_admin_utils.CcAdminUtils

    def pinned_ocsp(cert_chain: list[Any], settings: Any, mode: Any) -> tuple[Any, ...]:
        _ = settings
        start = (
            1
            if mode == config.BaseSettings.Certificate_Chain_Verification_Mode.GPU_ATTESTATION
            else 0
        )
        _ASKED.append(f"{mode.name}: {max(0, len(cert_chain) - 1 - start)} certificate(s)")
        return True, "", "good", None  # (status ok, warning, ocsp status, revocation reason)

    utils.ocsp_certificate_chain_validation = staticmethod(pinned_ocsp)
    utils.send_ocsp_request = staticmethod(_offline)
    utils.fetch_rim_file = staticmethod(_offline)
    urllib.request.urlopen = _offline
    return {
        "config": config,
        "utils": utils,
        "RIM": rim.RIM,
        "Verifier": verifier.Verifier,
        "AttestationReport": AttestationReport,
        "GpuCertificateChains": GpuCertificateChains,
        "TestHandle": TestHandle,
        "crypto": crypto,
    }


def _fail(e: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())}"}


def _read_report(path: str) -> bytes:
    data = Path(path).read_bytes()
    try:
        return bytes.fromhex("".join(data.decode("ascii").split()))
    except (UnicodeDecodeError, ValueError):
        return data


def run_case(m: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    """Every check of ``cc_admin.attest`` on one report; see the module docstring."""
    config, utils = m["config"], m["utils"]
    mode = config.BaseSettings.Certificate_Chain_Verification_Mode
    _PINNED[0] = datetime.fromisoformat(case["time"].replace("Z", "+00:00"))
    _ASKED.clear()
    report = _read_report(case["report"])
    chain_pem = Path(case["chain"]).read_bytes()
    leaf = m["crypto"].load_certificate(m["crypto"].FILETYPE_PEM, chain_pem)
    issuer = leaf.get_issuer().CN or ""
    arch = case.get("arch") or (
        "hopper"
        if issuer.startswith("GH100")
        else "blackwell"
        if issuer.startswith("GB100")
        else ""
    )
    out: dict[str, Any] = {"case": case.get("name"), "arch": arch, "checks": {}}
    if arch not in ("hopper", "blackwell"):
        out.update(
            supported=False, reason=f"not a GPU this verifier knows (leaf issuer {issuer!r})"
        )
        return out
    settings = (config.HopperSettings if arch == "hopper" else config.BlackwellSettings)()
    if case.get("rim_root"):
        settings.RIM_ROOT_CERT = str(Path(case["rim_root"]).resolve())
    checks: dict[str, dict[str, Any]] = out["checks"]
    try:
        att = m["AttestationReport"](report, settings)
        opaque = att.get_response_message().get_opaque_data()
        driver = opaque.get_data("OPAQUE_FIELD_ID_DRIVER_VERSION").decode().rstrip("\0")
        from verifier.utils import format_vbios_version

        vbios = format_vbios_version(opaque.get_data("OPAQUE_FIELD_ID_VBIOS_VERSION")).lower()
        checks["parse"] = {"ok": True, "driver": driver, "vbios": vbios}
    except Exception as e:
        checks["parse"] = _fail(e)
        return _finish(out)
    chain = m["GpuCertificateChains"](m["TestHandle"](chain_pem)).GpuAttestationCertificateChain
    report_fwid = opaque.get_data("OPAQUE_FIELD_ID_FWID")
    report_fwid = report_fwid.hex() if isinstance(report_fwid, bytes | bytearray) else ""
    try:  # verify_gpu_certificate_chain: FWID first, then the chain
        cert_fwid = utils.extract_fwid(chain[0], settings)
        checks["fwid"] = {"ok": report_fwid == "" or cert_fwid == report_fwid}
        if not checks["fwid"]["ok"]:
            checks["fwid"]["error"] = f"report {report_fwid[:16]}… != certificate {cert_fwid[:16]}…"
    except Exception as e:
        checks["fwid"] = _fail(e)
    try:
        ok, expired, _ = utils.verify_certificate_chain(list(chain), settings, mode.GPU_ATTESTATION)
        checks["chain"] = {"ok": bool(ok), "expired": bool(expired)}
    except Exception as e:
        checks["chain"] = _fail(e)
    ok, _, status, reason = utils.ocsp_certificate_chain_validation(
        list(chain), settings, mode.GPU_ATTESTATION
    )
    checks["ocsp"] = {"ok": ok, "status": status, "pinned": True}
    nonce = bytes.fromhex(case["nonce"])
    own_nonce = att.get_request_message().get_nonce()

    def report_check(n: bytes) -> dict[str, Any]:
        try:
            utils.verify_attestation_report(att, chain[0], n, driver, vbios, settings)
            return {"ok": True}
        except Exception as e:
            return _fail(e)

    first = report_check(nonce)
    nonce_failed = "NonceMismatch" in first.get("error", "")
    checks["nonce"] = first if nonce_failed else {"ok": True}
    checks["signature"] = report_check(own_nonce) if nonce_failed else first
    rims: dict[str, Any] = {}
    for kind in ("driver", "vbios"):
        path = case.get(f"{kind}_rim")
        if not path:
            continue
        key = f"{kind}_rim"
        try:
            rims[kind] = m["RIM"](rim_name=kind, settings=settings, rim_path=str(path))
        except Exception as e:
            checks[key] = _fail(e)
            continue
        try:
            rims[kind].verify(version=driver if kind == "driver" else vbios, settings=settings)
            checks[key] = {"ok": True}
        except Exception as e:
            checks[key] = _fail(e)
        matched = getattr(settings, f"gpu_{kind}_rim_version_matched")
        checks[key]["version_matched"] = matched
        checks[key]["cert_status"] = getattr(settings, f"gpu_{kind}_rim_cert_status", None)
        if matched is False:
            checks[key]["ok"] = False
            checks[key].setdefault("error", "RIM version differs from the report's (flagged)")
    if rims:
        lines = _Lines()
        config.info_log.addHandler(lines)
        try:
            v = m["Verifier"](
                att, rims.get("driver", _NoRim()), rims.get("vbios", _NoRim()), settings
            )
            ok = v.verify(settings)
            found = [_MISMATCH_LINE.match(s) for s in lines.lines]
            checks["measurements"] = {
                "ok": bool(ok),
                "mismatches": sorted(
                    (int(x.group(1)), "driver" if x.group(2) == "Driver" else "vbios")
                    for x in found
                    if x
                ),
            }
        except Exception as e:
            checks["measurements"] = _fail(e)
        finally:
            config.info_log.removeHandler(lines)
    out["ocsp"] = {"pinned": "good", "asked": list(_ASKED), "reason": reason}
    return _finish(out)


ORDER = ("parse", "fwid", "chain", "ocsp", "nonce", "signature", "driver_rim", "vbios_rim")


def _finish(out: dict[str, Any]) -> dict[str, Any]:
    checks = out["checks"]
    failed = [k for k in (*ORDER, "measurements") if k in checks and not checks[k]["ok"]]
    out["supported"] = True
    out["first_failure"] = failed[0] if failed else None
    out["verdict"] = not failed
    return out


def timed(m: dict[str, Any], case: dict[str, Any], runs: int) -> dict[str, Any]:
    result = run_case(m, case)
    if runs > 0:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            run_case(m, case)
            times.append(time.perf_counter() - t0)
        result["timing"] = {"runs": runs, "median_s": statistics.median(times)}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--batch", help="JSON file: a list of cases (objects with the options below)")
    p.add_argument("--report", help="SPDM report: hex text (NVIDIA's .txt) or raw bytes")
    p.add_argument("--chain", help="the device chain, PEM, leaf first")
    p.add_argument("--driver-rim")
    p.add_argument("--vbios-rim")
    p.add_argument("--rim-root", help="RIM root PEM instead of the package's pinned one")
    p.add_argument("--nonce", help="the expected request nonce, 64 hex digits")
    p.add_argument("--time", help="verification time, ISO 8601 (e.g. 2024-06-01T00:00:00Z)")
    p.add_argument("--arch", choices=("hopper", "blackwell"), help="default: from the leaf issuer")
    p.add_argument("--runs", type=int, default=0, help="also time N more runs (median)")
    a = p.parse_args(argv)
    if a.batch:
        cases = json.loads(Path(a.batch).read_text())
    elif a.report and a.chain and a.nonce and a.time:
        cases = [
            {
                "report": a.report, "chain": a.chain, "driver_rim": a.driver_rim,
                "vbios_rim": a.vbios_rim, "rim_root": a.rim_root, "nonce": a.nonce,
                "time": a.time, "arch": a.arch, "runs": a.runs,
            }
        ]  # fmt: skip
    else:
        p.error("give --batch, or --report, --chain, --nonce and --time")
    from importlib.metadata import version

    m = _install_patches()
    for case in cases:
        result = timed(m, case, int(case.get("runs") or 0))
        result["oracle"] = f"nv-local-gpu-verifier {version('nv-local-gpu-verifier')}"
        print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
