"""Time to verify one piece of evidence with cached collateral (median over many runs).

Uses the real vectors (SHIELDML_VECTORS, default ../shared/vectors) at their verification times,
and the simulated platform. The target is under 5 ms per verification.
Run: ``make bench`` (writes docs/benchmarks.md) or ``python benchmarks/bench_attest.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from shieldml.attest import IntelCollateral, TrustAnchors, verify_evidence
from shieldml.testing.simulated import SimulatedPlatform, system_clock

sys.path.insert(0, str(Path(__file__).parent))
from bench_files import write_page


def cases(vectors: Path) -> dict[str, Callable[[], object]]:
    phala = vectors / "attestation" / "intel" / "phala"
    amd = vectors / "attestation" / "amd" / "virtee"
    out: dict[str, Callable[[], object]] = {}
    for name, q, c in [
        ("SGX quote v3 (real)", "sgx_quote.bin", "sgx_quote_collateral.json"),
        ("TDX quote v4 (real)", "tdx_quote_v4.bin", "tdx_quote_v4_collateral.json"),
    ]:
        raw, col = (phala / q).read_bytes(), IntelCollateral.from_json((phala / c).read_text())
        t = datetime(2025, 7, 1, tzinfo=UTC)
        out[name] = lambda raw=raw, col=col, t=t: verify_evidence(raw, collateral=col, now=t)
    report, vcek = (amd / "report_milan.bin").read_bytes(), (amd / "vcek_milan.der").read_bytes()
    chain = x509.load_pem_x509_certificates((amd / "cert_chain_milan.pem").read_bytes())
    at = datetime(2026, 1, 1, tzinfo=UTC)
    out["SEV-SNP report v2 (real)"] = lambda: verify_evidence(
        report, vcek=vcek, cert_chain=chain, now=at
    )
    plat = SimulatedPlatform.create(clock=system_clock)
    trust: TrustAnchors = plat.trust()
    now = datetime.now(UTC)
    sq, scol = plat.tdx_quote(now=now)
    out["TDX quote v4 (simulated)"] = lambda: verify_evidence(
        sq, collateral=scol, now=now, trust=trust
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=200)
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
    lines = [
        f"median of {args.runs} verifications each, collateral already in memory",
        "",
        "| evidence | median ms | p95 ms |",
        "|---|---:|---:|",
    ]
    for name, fn in cases(vectors).items():
        fn()  # warm up
        ts = []
        for _ in range(args.runs):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        ts.sort()
        lines.append(f"| {name} | {statistics.median(ts):.2f} | {ts[int(len(ts) * 0.95)]:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        write_page(Path(args.markdown), table, "bench_attest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
