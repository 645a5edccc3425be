"""Broker throughput: releases per second and latency at N concurrent clients, loopback only.

Each client loops: challenge -> simulated SGX quote binding the nonce, a fresh HPKE key and the
workload digest -> release (full verification of the evidence and its collateral, policy, HPKE
sealing, audit append). Runs against SQLite and against a throw-away PostgreSQL cluster. Bounded
in time; stops by itself. Run: ``python benchmarks/bench_broker.py [--seconds 20] [--clients 16]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from tempfile import mkdtemp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.broker.procs import start_broker  # noqa: E402
from tests.pg import PgCluster  # noqa: E402

from bench_files import write_page  # noqa: E402
from shieldml.attest.simulated import SimulatedPlatform  # noqa: E402
from shieldml.broker import protocol  # noqa: E402
from shieldml.broker.client import BrokerClient  # noqa: E402

MRENCLAVE = b"\x5a" * 32
WD = "sha256:" + "cd" * 32
POLICY = f"""
[[profile]]
tee = "sgx"
mrenclave = ["{MRENCLAVE.hex()}"]
mrsigner = "any"
isv_prod_id = 0
min_isv_svn = 0
workload_digest = ["{WD}"]
insecure_allow_simulated = true
"""


def run(
    db: str, database: str | None, clients: int, seconds: float, workers: int
) -> dict[str, object]:
    work = Path(mkdtemp(prefix=f"shieldml-bench-{db}-"))
    SimulatedPlatform.open(work / "sim")
    bp = start_broker(
        work / "state",
        "--simulated-platform",
        str(work / "sim"),
        "--workers",
        str(workers),
        database=database,
    )
    try:
        time.sleep(1.0)  # let every worker come up
        with BrokerClient(
            bp.url, fingerprint=bp.fingerprint, token=bp.token_file.read_text().strip()
        ) as admin:
            admin.add_key("model", "stream", bytes(32))
            admin.set_policy("model", POLICY)
        sim = SimulatedPlatform.open(work / "sim")
        collateral = json.loads(sim.collateral("sgx").to_json())
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        stop = time.monotonic() + seconds

        def client() -> None:
            with BrokerClient(bp.url, fingerprint=bp.fingerprint) as c:
                while time.monotonic() < stop:
                    t = time.perf_counter()
                    try:
                        nonce = c.challenge()
                        rk = protocol.RunnerKey.generate()
                        rd = protocol.report_data(nonce, rk.kem_id, rk.public_bytes, WD)
                        quote, _ = sim.sgx_quote(report_data=rd, mrenclave=MRENCLAVE)
                        c.release(nonce, rk, WD, ["model"], quote, collateral=collateral)
                    except Exception as e:
                        with lock:
                            errors.append(type(e).__name__)
                        continue
                    with lock:
                        latencies.append(time.perf_counter() - t)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - t0
    finally:
        bp.stop()
    latencies.sort()
    n = len(latencies)
    return {
        "database": db,
        "clients": clients,
        "workers": workers,
        "seconds": round(elapsed, 1),
        "releases": n,
        "errors": len(errors),
        "releases_per_s": round(n / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1e3, 1) if n else None,
        "p99_ms": round(latencies[int(n * 0.99) - 1] * 1e3, 1) if n else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--markdown")
    args = ap.parse_args()
    rows = [run("sqlite", None, args.clients, args.seconds, args.workers)]
    pg = PgCluster()
    if pg.available is None:
        pg.start()
        try:
            rows.append(
                run(
                    "postgresql",
                    pg.create_database("bench"),
                    args.clients,
                    args.seconds,
                    args.workers,
                )
            )
        finally:
            pg.stop()
    else:
        print(f"skipping PostgreSQL: {pg.available}", file=sys.stderr)
    lines = [
        f"{args.clients} concurrent clients for {args.seconds:.0f} s each, broker with {args.workers} worker processes, "
        "load generator on the same 2 cores; a release = challenge + simulated SGX quote + release",
        "",
        "| database | releases | errors | releases/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['database']} | {r['releases']} | {r['errors']} | {r['releases_per_s']} | {r['p50_ms']} | {r['p99_ms']} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        write_page(Path(args.markdown), table, "bench_broker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
