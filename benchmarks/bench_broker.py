"""Broker throughput: releases per second and latency at N concurrent clients, loopback only.

Each client loops: challenge -> simulated SGX quote binding the nonce, a fresh HPKE key and the
workload digest -> release (full verification of the evidence and its collateral, policy, HPKE
sealing, audit append). Runs against SQLite and against a throw-away PostgreSQL cluster. Bounded
in time; stops by itself. Run: ``python benchmarks/bench_broker.py [--seconds 20] [--clients 16]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import threading
import time
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.broker.conftest import MRENCLAVE, POLICY, WD  # noqa: E402
from tests.pg import PgCluster  # noqa: E402

from bench_files import write_page  # noqa: E402
from shieldml.broker import protocol  # noqa: E402
from shieldml.broker.client import BrokerClient  # noqa: E402
from shieldml.testing.brokers import start_broker  # noqa: E402
from shieldml.testing.simulated import SimulatedPlatform, system_clock  # noqa: E402


def _load(url: str, fingerprint: str, sim_dir: str, threads: int, stop: float, queue: Any) -> None:
    """One load-generating process: ``threads`` clients in a loop until ``stop``."""
    sim = SimulatedPlatform.open(sim_dir, clock=system_clock)
    collateral = json.loads(sim.collateral("sgx").to_json())
    latencies: list[tuple[float, float]] = []  # (whole cycle, the /v1/release call alone)
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        with BrokerClient(url, fingerprint=fingerprint) as c:
            while time.time() < stop:
                t = time.perf_counter()
                try:
                    nonce = c.challenge()
                    rk = protocol.RunnerKey.generate()
                    rd = protocol.report_data(nonce, rk.kem_id, rk.public_bytes, WD)
                    quote, _ = sim.sgx_quote(report_data=rd, mrenclave=MRENCLAVE)
                    t_release = time.perf_counter()
                    c.release(nonce, rk, WD, ["model"], quote, collateral=collateral)
                except Exception as e:  # counted and reported
                    with lock:
                        errors.append(type(e).__name__)
                    continue
                end = time.perf_counter()
                with lock:
                    latencies.append((end - t, end - t_release))

    ths = [threading.Thread(target=client) for _ in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    queue.put((latencies, errors))


def run(
    db: str, database: str | None, clients: int, seconds: float, workers: int, procs: int
) -> dict[str, object]:
    work = Path(mkdtemp(prefix=f"shieldml-bench-{db}-"))
    SimulatedPlatform.open(work / "sim", clock=system_clock)
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
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        stop = time.time() + seconds
        t0 = time.perf_counter()
        workers_ = [
            ctx.Process(
                target=_load, args=(bp.url, bp.fingerprint, str(work / "sim"), n, stop, queue)
            )
            for n in per
        ]
        for p in workers_:
            p.start()
        latencies: list[tuple[float, float]] = []
        errors: list[str] = []
        for _ in workers_:
            lat, err = queue.get(timeout=seconds + 120)
            latencies += lat
            errors += err
        for p in workers_:
            p.join()
        elapsed = time.perf_counter() - t0
    finally:
        bp.stop()
    n = len(latencies)
    cycle = sorted(x[0] for x in latencies)
    call = sorted(x[1] for x in latencies)

    def pct(xs: list[float], q: float) -> float | None:
        return round(xs[max(0, int(len(xs) * q) - 1)] * 1e3, 1) if xs else None

    return {
        "database": db,
        "clients": clients,
        "workers": workers,
        "seconds": round(elapsed, 1),
        "releases": n,
        "errors": len(errors),
        "releases_per_s": round(n / elapsed, 1),
        "p50_ms": pct(cycle, 0.5),
        "p99_ms": pct(cycle, 0.99),
        "release_call_p50_ms": pct(call, 0.5),
        "release_call_p99_ms": pct(call, 0.99),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--client-procs", type=int, default=1, help="load-generator processes")
    ap.add_argument(
        "--databases", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql"
    )
    ap.add_argument("--markdown")
    args = ap.parse_args()
    wanted = {d.strip() for d in args.databases.split(",") if d.strip()}
    if not wanted or wanted - {"sqlite", "postgresql"}:
        ap.error("--databases takes sqlite, postgresql or both")
    rows = []
    if "sqlite" in wanted:
        rows.append(
            run("sqlite", None, args.clients, args.seconds, args.workers, args.client_procs)
        )
    pg = PgCluster()
    if "postgresql" not in wanted:
        pass
    elif pg.available is None:
        pg.start()
        try:
            rows.append(
                run(
                    "postgresql",
                    pg.create_database("bench"),
                    args.clients,
                    args.seconds,
                    args.workers,
                    args.client_procs,
                )
            )
        finally:
            pg.stop()
    else:
        print(f"skipping PostgreSQL: {pg.available}", file=sys.stderr)
    lines = [
        f"{args.clients} concurrent clients ({args.client_procs} load processes) for {args.seconds:.0f} s each, "
        f"broker with {args.workers} worker processes, all on the same 2 cores; "
        "a release = challenge + simulated SGX quote + release, latency measured at the client",
        "",
        "| database | releases | errors | releases/s | cycle p50 ms | cycle p99 ms | /v1/release p50 ms | /v1/release p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['database']} | {r['releases']} | {r['errors']} | {r['releases_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['release_call_p50_ms']} | {r['release_call_p99_ms']} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        write_page(Path(args.markdown), table, "bench_broker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
