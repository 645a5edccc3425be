"""One verification of evidence, shieldml against the fastest peer verifier, side by side.

Each round runs every variant of a case back to back (shieldml without a cache, shieldml with a
warm ``VerificationCache``, the peer), ``--per-round`` verifications each; a round's figure is the
median of its verifications, the table gives the median over ``--rounds`` rounds and the median of
the per-round ratios (shieldml / peer: below 1 is faster than the peer).

Peers: Phala's ``dcap-qvl`` (Rust, a dev dependency) for DCAP quotes; for SEV-SNP the floor of
the work itself (one ECDSA-P384 verification of the report and three RSA-4096-PSS certificate
signatures, ``cryptography``) and, where ``SHIELDML_SNP_PEER_PYTHON`` names an interpreter with
``sev_attest_tool`` installed (a Rust SNP verifier from PyPI, kept out of shieldml's venv), its
time on its own sample report, measured in a child process in the same rounds. For NVIDIA GPU
evidence, where ``.venv-nvoracle`` exists (``make nv-oracle``; or ``SHIELDML_NV_ORACLE_VENV``),
NVIDIA's ``nv-local-gpu-verifier`` 2.7.3 on the same report and RIM, driven by
``scripts/nv_oracle.py`` in a child process each round (its own median of ``--per-round`` runs
after a warm-up; its OCSP call pinned to "good" and its clock pinned, as ours gets no OCSP
responses and the same time).

Uses the real vectors (SHIELDML_VECTORS, default ../shared/vectors) at their verification times,
and the simulated platform. Run: ``make bench`` (writes docs/benchmarks.md) or
``python benchmarks/bench_attest.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from shieldml.attest import (
    IntelCollateral,
    TrustAnchors,
    VerificationCache,
    load_gpu_chain,
    verify_evidence,
    verify_gpu_evidence,
)
from shieldml.testing.simulated import SimulatedPlatform, system_clock

sys.path.insert(0, str(Path(__file__).parent))
from bench_files import write_page

Fn = Callable[[], object]


@dataclass
class Case:
    name: str
    ours: Fn
    cached: Fn
    peer: Fn | None
    peer_name: str
    note: str = ""
    extra: dict[str, Fn] = field(default_factory=dict)
    #: a peer timed in a child process: runs -> its median ms (None: it did not run)
    peer_ms: Callable[[int], float | None] | None = None


def _dcap_peer(raw: bytes, col: IntelCollateral, at: datetime, root_der: bytes | None) -> Fn | None:
    try:
        import dcap_qvl
    except ImportError:
        return None
    theirs = dcap_qvl.QuoteCollateralV3.from_json(col.to_json())
    secs = int(at.timestamp())
    if root_der is None:
        return lambda: dcap_qvl.verify(raw, theirs, secs)
    return lambda: dcap_qvl.verify_with_root_ca(raw, theirs, root_der, secs)


def _snp_floor(report: bytes, vcek_der: bytes, chain: list[x509.Certificate]) -> Fn:
    """The signatures an SNP verification cannot skip, alone: report (P-384), VCEK <- ASK,
    ASK <- ARK, ARK self-signed (RSA-4096 PSS)."""
    vcek = x509.load_der_x509_certificate(vcek_der)
    key = vcek.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    r = int.from_bytes(report[0x2A0 : 0x2A0 + 72], "little")
    s = int.from_bytes(report[0x2A0 + 72 : 0x2A0 + 144], "little")
    sig, signed = encode_dss_signature(r, s), report[:0x2A0]
    ask, ark = chain[0], chain[-1]
    pairs = [(vcek, ask), (ask, ark), (ark, ark)]

    def run() -> None:
        key.verify(sig, signed, ec.ECDSA(hashes.SHA384()))
        for cert, issuer in pairs:
            pub = issuer.public_key()
            assert isinstance(pub, rsa.RSAPublicKey)
            pub.verify(
                cert.signature,
                cert.tbs_certificate_bytes,
                padding.PSS(padding.MGF1(hashes.SHA384()), 48),
                hashes.SHA384(),
            )

    return run


_SNP_PEER = """
import json, statistics, sys, time
import sev_attest_tool as s
n = int(sys.argv[1])
s.verify_attestation_report(s.SAMPLE_ATTESTATION, s.SAMPLE_VCEK)
ts = []
for _ in range(n):
    t = time.perf_counter()
    s.verify_attestation_report(s.SAMPLE_ATTESTATION, s.SAMPLE_VCEK)
    ts.append(time.perf_counter() - t)
print(json.dumps(statistics.median(ts)))
"""


def cases(vectors: Path) -> list[Case]:
    phala = vectors / "attestation" / "intel" / "phala"
    amd = vectors / "attestation" / "amd" / "virtee"
    out: list[Case] = []
    for name, q, c in [
        ("SGX quote v3 (real)", "sgx_quote.bin", "sgx_quote_collateral.json"),
        ("TDX quote v4 (real)", "tdx_quote_v4.bin", "tdx_quote_v4_collateral.json"),
    ]:
        raw, col = (phala / q).read_bytes(), IntelCollateral.from_json((phala / c).read_text())
        t = datetime(2025, 7, 1, tzinfo=UTC)
        cache = VerificationCache()
        out.append(
            Case(
                name,
                lambda raw=raw, col=col, t=t: verify_evidence(raw, collateral=col, now=t),
                lambda raw=raw, col=col, t=t, cache=cache: verify_evidence(
                    raw, collateral=col, now=t, cache=cache
                ),
                _dcap_peer(raw, col, t, None),
                "dcap-qvl",
            )
        )
    plat = SimulatedPlatform.create(clock=system_clock)
    trust: TrustAnchors = plat.trust()
    now = datetime.now(UTC)
    for name, (sq, scol) in [
        ("SGX quote v3 (simulated)", plat.sgx_quote(now=now)),
        ("TDX quote v4 (simulated)", plat.tdx_quote(now=now)),
    ]:
        cache = VerificationCache()
        peer = _dcap_peer(sq, scol, now, scol.tcb_info_issuer_chain[-1].public_bytes(Encoding.DER))
        note = ""
        if peer is not None:
            try:
                peer()
            except ValueError as e:  # dcap-qvl's own refusal, reported in the table's notes
                note = f"dcap-qvl refuses the simulated collateral: {str(e).splitlines()[0]}"
                peer = None
        out.append(
            Case(
                name,
                lambda sq=sq, scol=scol: verify_evidence(sq, collateral=scol, now=now, trust=trust),
                lambda sq=sq, scol=scol, cache=cache: verify_evidence(
                    sq, collateral=scol, now=now, trust=trust, cache=cache
                ),
                peer,
                "dcap-qvl",
                note,
            )
        )
    report, vcek = (amd / "report_milan.bin").read_bytes(), (amd / "vcek_milan.der").read_bytes()
    chain = x509.load_pem_x509_certificates((amd / "cert_chain_milan.pem").read_bytes())
    at = datetime(2026, 1, 1, tzinfo=UTC)
    cache = VerificationCache()
    out.append(
        Case(
            "SEV-SNP report v2 (real)",
            lambda: verify_evidence(report, vcek=vcek, cert_chain=chain, now=at),
            lambda: verify_evidence(report, vcek=vcek, cert_chain=chain, now=at, cache=cache),
            _snp_floor(report, vcek, chain),
            "floor: the 4 signatures alone",
        )
    )
    out.extend(gpu_cases(vectors))
    return out


def _median_ms(fn: Fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def _snp_peer_ms(python: str, n: int) -> float | None:
    try:
        out = subprocess.run(
            [python, "-c", _SNP_PEER, str(n)], capture_output=True, text=True, timeout=120
        )
        return float(json.loads(out.stdout)) * 1e3 if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


NV_ORACLE_VENV = Path(
    os.environ.get(
        "SHIELDML_NV_ORACLE_VENV", Path(__file__).resolve().parents[1] / ".venv-nvoracle"
    )
)


def _nv_oracle(case: dict[str, str]) -> Callable[[int], float | None] | None:
    """NVIDIA's nv-local-gpu-verifier on ``case`` in its own venv: runs -> median ms."""
    python = NV_ORACLE_VENV / "bin" / "python"
    script = Path(__file__).resolve().parents[1] / "scripts" / "nv_oracle.py"
    if not python.exists():
        return None

    def run(n: int) -> float | None:
        args = [str(python), str(script), "--runs", str(n)]
        args += [f"--{k.replace('_', '-')}={v}" for k, v in case.items()]
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=300)
            result = json.loads(out.stdout.splitlines()[-1])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None
        if not result.get("verdict"):  # it must accept what ours accepts, or the time means nothing
            return None
        return float(result["timing"]["median_s"]) * 1e3

    return run


def gpu_cases(vectors: Path) -> list[Case]:
    """NVIDIA evidence (README of vectors/attestation/nvidia: E4 + PROD VBIOS RIM at
    2024-06-01, the LS10 switch + its RIM at 2026-12-01): chains uncached (a new cache per
    verification) and cached (one cache across runs, as a broker keeps it); RIM XML-DSig and
    measurement comparison run every time."""
    nv = vectors / "attestation" / "nvidia"
    g = nv / "nvat/testdata/sample_attestation_data/gpu"
    e4 = bytes.fromhex("".join((g / "hopperAttestationReport.txt").read_text().split()))
    e4_chain = load_gpu_chain((g / "hopperCertChain.txt").read_bytes())
    e4_nonce = bytes.fromhex("27a328247bf7935c993341cf587be6f05986ccce4fe7ba2c54100bd616a58f66")
    vbios = (nv / "nvtrust/samples/1010_0200_882_96005E0001_PROD.swidtag").read_bytes()
    sw = bytes.fromhex(
        "".join((nv / "nvat/testdata/switchAttestationReport.txt").read_text().split())
    )
    sw_chain = load_gpu_chain((nv / "nvat/testdata/switchCertChain.txt").read_bytes())
    sw_rim = (
        nv / "nvat/testdata/switchVBIOSRim_NV_SWITCH_BIOS_5612_0002_890_9610550001.xml"
    ).read_bytes()
    t_e4, t_sw = datetime(2024, 6, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    shared = VerificationCache()

    def e4_run(rims: list[bytes], cache: VerificationCache | None) -> object:
        return verify_gpu_evidence(
            e4, e4_chain, now=t_e4, trust=TrustAnchors(), nonce=e4_nonce, rims=rims,
            cache=cache if cache is not None else VerificationCache(),
        )  # fmt: skip

    def sw_run(cache: VerificationCache | None) -> object:
        return verify_gpu_evidence(
            sw, sw_chain, now=t_sw, trust=TrustAnchors(), rims=[sw_rim],
            cache=cache if cache is not None else VerificationCache(),
        )  # fmt: skip

    oracle = {
        "report": str(g / "hopperAttestationReport.txt"),
        "chain": str(g / "hopperCertChain.txt"),
        "nonce": e4_nonce.hex(),
        "time": t_e4.isoformat(),
    }
    no_rim, with_rim = (
        _nv_oracle(oracle),
        _nv_oracle(
            {
                **oracle,
                "vbios_rim": str(nv / "nvtrust/samples/1010_0200_882_96005E0001_PROD.swidtag"),
            }
        ),
    )
    peer_name = "nv-local-gpu-verifier 2.7.3" if no_rim else "none"
    gpu_note = (
        "peer: NVIDIA's nv-local-gpu-verifier 2.7.3 (Python, deprecated), same report/RIM/time, "
        "in its own venv via scripts/nv_oracle.py, its OCSP call pinned to 'good' (no network)"
        if no_rim
        else "no NVIDIA peer: .venv-nvoracle not found (`make nv-oracle` installs it)"
    )
    return [
        Case(
            "NVIDIA H100 report, no RIM (real)",
            lambda: e4_run([], None),
            lambda: e4_run([], shared),
            None,
            peer_name,
            gpu_note,
            peer_ms=no_rim,
        ),
        Case(
            "NVIDIA H100 report + VBIOS RIM (real)",
            lambda: e4_run([vbios], None),
            lambda: e4_run([vbios], shared),
            None,
            peer_name,
            peer_ms=with_rim,
        ),
        Case(
            "NVSwitch LS10 report + RIM (real)",
            lambda: sw_run(None),
            lambda: sw_run(shared),
            None,
            "none",
            "nv-local-gpu-verifier has no NVSwitch support (that is nv-attestation-sdk)",
        ),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--markdown", help="write the results into this page")
    args = ap.parse_args()
    vectors = Path(
        os.environ.get(
            "SHIELDML_VECTORS", Path(__file__).resolve().parents[2] / "shared" / "vectors"
        )
    )
    if not vectors.is_dir():
        print(f"vectors not found at {vectors}; set SHIELDML_VECTORS", file=sys.stderr)
        return 1
    all_cases = cases(vectors)
    snp_python = os.environ.get("SHIELDML_SNP_PEER_PYTHON")
    for c in all_cases:  # warm up (and fill each cache)
        c.ours(), c.cached(), c.peer() if c.peer else None
    figs: dict[str, dict[str, list[float]]] = {c.name: {} for c in all_cases}
    snp_peer: list[float] = []
    for _ in range(args.rounds):
        for c in all_cases:
            for label, fn in (("ours", c.ours), ("cached", c.cached), ("peer", c.peer)):
                if fn is not None:
                    figs[c.name].setdefault(label, []).append(_median_ms(fn, args.per_round))
            if c.peer_ms is not None:
                ms = c.peer_ms(args.per_round)
                if ms is None:  # keep the rounds paired: no peer column for this case
                    c.peer_ms, c.note = None, f"{c.note}; the peer failed to run".lstrip("; ")
                    figs[c.name].pop("peer", None)
                else:
                    figs[c.name].setdefault("peer", []).append(ms)
        if snp_python:
            ms = _snp_peer_ms(snp_python, args.per_round)
            if ms is not None:
                snp_peer.append(ms)
    med = statistics.median
    lines = [
        f"{args.rounds} interleaved rounds of {args.per_round} verifications per variant; "
        "figures are medians over rounds of each round's median; ratio = shieldml / peer, "
        "median of the per-round ratios (below 1: faster than the peer)",
        "",
        "| evidence | peer | peer ms | shieldml ms | ratio | shieldml + cache ms | ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for c in all_cases:
        f = figs[c.name]
        ours, cached = med(f["ours"]), med(f["cached"])
        if "peer" in f:
            r1 = med([a / b for a, b in zip(f["ours"], f["peer"], strict=True)])
            r2 = med([a / b for a, b in zip(f["cached"], f["peer"], strict=True)])
            peer_ms, ratio1, ratio2 = f"{med(f['peer']):.3f}", f"{r1:.2f}", f"{r2:.2f}"
        else:
            peer_ms = ratio1 = ratio2 = "n/a"
        lines.append(
            f"| {c.name} | {c.peer_name} | {peer_ms} | {ours:.3f} | {ratio1} | {cached:.3f} | {ratio2} |"
        )
        if c.note:
            notes.append(f"- {c.name}: {c.note}")
    if snp_peer:
        notes.append(
            f"- SEV-SNP peer `sev_attest_tool` 0.2.4 (Rust, PyPI; on its own bundled sample report "
            f"and VCEK, a different input): {med(snp_peer):.3f} ms median over the same rounds"
        )
    elif snp_python:
        notes.append(f"- SEV-SNP peer: `sev_attest_tool` did not run under {snp_python}")
    else:
        notes.append(
            "- SEV-SNP peer: none in shieldml's environment (set SHIELDML_SNP_PEER_PYTHON to an "
            "interpreter with `sev_attest_tool` for its column in the notes)"
        )
    table = "\n".join(lines + (["", *notes] if notes else []))
    print(table)
    if args.markdown:
        write_page(Path(args.markdown), table, "bench_attest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
