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
    out.update(gpu_cases(vectors))
    return out


def gpu_cases(vectors: Path) -> dict[str, Callable[[], object]]:
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

    return {
        "NVIDIA H100 report, no RIM, chain uncached (real)": lambda: e4_run([], None),
        "NVIDIA H100 report, no RIM, chain cached (real)": lambda: e4_run([], shared),
        "NVIDIA H100 report + VBIOS RIM, chains uncached (real)": lambda: e4_run([vbios], None),
        "NVIDIA H100 report + VBIOS RIM, chains cached (real)": lambda: e4_run([vbios], shared),
        "NVSwitch LS10 report + RIM, chains cached (real)": lambda: sw_run(shared),
    }


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
    rounds = 5
    per = max(1, args.runs // rounds)
    lines = [
        f"median of {rounds} interleaved rounds of {per} verifications each (every row measured"
        " in every round, so load that changes during the run weighs on all rows alike),"
        " collateral already in memory",
        "",
        "| evidence | median ms | p95 ms |",
        "|---|---:|---:|",
    ]
    fns = cases(vectors)
    for fn in fns.values():
        fn()  # warm up
    medians: dict[str, list[float]] = {n: [] for n in fns}
    every: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            ts = []
            for _ in range(per):
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e3)
            medians[name].append(statistics.median(ts))
            every[name] += ts
    for name in fns:
        ts = sorted(every[name])
        lines.append(
            f"| {name} | {statistics.median(medians[name]):.2f} | {ts[int(len(ts) * 0.95)]:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        write_page(Path(args.markdown), table, "bench_attest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
