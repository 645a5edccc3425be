"""Broker under load and faults (loopback only, bounded in time, stops by itself).

Two broker replicas on one throw-away PostgreSQL cluster; N concurrent clients (in several
processes) releasing keys with simulated SGX evidence for D seconds, while: PostgreSQL is
restarted (at D/4), one replica is SIGKILLed and restarted (at D/2), the key-encryption key is
rotated by a separate process (at 3D/4), replica B's clock is skewed (+2 h, then -2 h after its
restart; libfaketime, when installed: ``apt-get install faketime``), clients replay used nonces,
use nonces after they expired, send oversized bodies, and 128 slow clients hold connections
open trickling headers or bodies a few bytes a second (slowloris). Reports requests served, errors by
kind, p99 latency, audit records lost or duplicated (must be 0) and nonces accepted twice (must
be 0); exits 1 unless those hold and every slow client was answered and closed (within 15 s of the
end of the load). Run: ``python benchmarks/soak_broker.py [--seconds 60] [--clients 64]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import random
import signal
import ssl
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from tests.broker.conftest import MRENCLAVE, POLICY, WD, raw_tls_socket  # noqa: E402
from tests.pg import PgCluster  # noqa: E402

from bench_files import write_page  # noqa: E402
from shieldml.broker import protocol  # noqa: E402
from shieldml.broker.audit import AuditRecord, verify_log, verify_tree  # noqa: E402
from shieldml.broker.client import BrokerClient  # noqa: E402
from shieldml.broker.tlog import NoteSigner  # noqa: E402
from shieldml.errors import (  # noqa: E402
    AuditChainError,
    BrokerError,
    ShieldError,
)
from shieldml.testing.brokers import start_broker  # noqa: E402
from shieldml.testing.simulated import SimulatedPlatform, fixed_clock, system_clock  # noqa: E402

NONCE_TTL = 3.0
DAY_AGO = datetime.now(UTC) - timedelta(days=1)
SKEW = ("+2h", "-2h")  # replica B's clock before and after its restart
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


def skewed(offset: str) -> dict[str, str]:
    """Environment that runs a process with its wall clock ``offset`` off (monotonic untouched)."""
    if not LIBFAKETIME.exists():
        return {}
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_RESET": "1",
    }


def clock_offset(url: str, fingerprint: str) -> float:
    """A broker's wall clock minus ours, in seconds, from its HTTP Date header."""
    from email.utils import parsedate_to_datetime

    with BrokerClient(url, fingerprint=fingerprint) as c:
        r = c.http.get("/v1/health")
    return parsedate_to_datetime(r.headers["date"]).timestamp() - time.time()


def _load(
    urls: list[tuple[str, str]], sim_dir: str, threads: int, stop: float, queue: Any, seed: int
) -> None:
    sim = SimulatedPlatform.open(sim_dir, clock=system_clock)
    # issued a day ago, like real collateral: a replica whose clock is hours off still accepts it
    collateral = json.loads(sim.collateral("sgx", now=DAY_AGO).to_json())
    lock = threading.Lock()
    stats: dict[str, Any] = {
        "ok": 0,
        "lat": [],
        "errors": collections.Counter(),
        "replays_accepted": 0,
        "stale_accepted": 0,
        "oversized_ok": 0,
        "nonces": [],
    }

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        clients = [BrokerClient(u, fingerprint=f, timeout=10) for u, f in urls]
        last: tuple[BrokerClient, bytes, protocol.RunnerKey, bytes] | None = None
        while time.time() < stop:
            c = rng.choice(clients)
            roll = rng.random()
            t = time.perf_counter()
            try:
                if roll < 0.05 and last is not None:  # replay a used nonce
                    lc, nonce, rk, quote = last
                    try:
                        lc.release(nonce, rk, WD, ["model"], quote, collateral=collateral)
                        with lock:
                            stats["replays_accepted"] += 1
                    except BrokerError as e:
                        with lock:
                            stats["errors"][f"replay refused {e.status}"] += 1
                    continue
                if roll < 0.07:  # oversized body
                    try:
                        r = c.http.post(
                            "/v1/release",
                            content=b"{" + b" " * (2 << 20) + b"}",
                            headers={"content-type": "application/json"},
                        )
                    except httpx.HTTPError as e:
                        with lock:
                            stats["errors"][f"oversized {type(e).__name__}"] += 1
                        continue
                    with lock:
                        stats["errors"][f"oversized {r.status_code}"] += 1
                        stats["oversized_ok"] += r.status_code < 400
                    continue
                nonce = c.challenge()
                if roll < 0.09:  # a nonce used after it expired (a slow or skewed client)
                    time.sleep(NONCE_TTL + 0.5)
                rk = protocol.RunnerKey.generate()
                quote, _ = sim.sgx_quote(
                    report_data=protocol.report_data(nonce, rk.kem_id, rk.public_bytes, WD),
                    mrenclave=MRENCLAVE,
                )
                c.release(nonce, rk, WD, ["model"], quote, collateral=collateral)
                with lock:
                    if roll < 0.09:
                        stats["stale_accepted"] += 1
                    stats["ok"] += 1
                    stats["lat"].append(time.perf_counter() - t)
                    stats["nonces"].append(nonce.hex())
                last = (c, nonce, rk, quote)
            except BrokerError as e:
                with lock:
                    stats["errors"][
                        f"HTTP {e.status}" + (" (stale nonce)" if roll < 0.09 else "")
                    ] += 1
            except ShieldError as e:
                with lock:
                    stats["errors"][
                        type(e).__name__ + ": " + e.message.split(":")[-1].strip()[:40]
                    ] += 1
        for cl in clients:
            cl.close()

    ths = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    stats["errors"] = dict(stats["errors"])
    queue.put(stats)


def _slowloris(url: str, n: int, stop: float, out: dict[str, int]) -> None:
    """Hold n connections open, half trickling headers and half a body, a few bytes a second;
    count, per kind, the connections the broker answered (408) and closed."""
    socks: list[tuple[ssl.SSLSocket, bytes, str]] = []
    for i in range(n):
        try:
            s = raw_tls_socket(url)
            head = b"POST /v1/release HTTP/1.1\r\nHost: broker\r\n"
            if i % 2:
                head += b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
            s.sendall(head)
            s.setblocking(False)
            socks.append((s, b" " * 8, "bodies") if i % 2 else (s, b"X-Slow: 1\r\n", "heads"))
        except OSError:
            out["refused"] += 1
    out["opened"] = len(socks)
    # past the end of the load, allow the broker its 10 s timeouts (plus slack) for the last ones
    grace = max(stop, time.time()) + 15
    while time.time() < grace and socks:
        time.sleep(1)
        for entry in list(socks):
            s, drip, kind = entry
            try:
                reply = s.recv(4096)
            except ssl.SSLWantReadError:
                reply = None  # nothing from the broker yet
            except OSError:
                reply = b""
            if reply is not None:  # answered (408) or hung up: a real client gives up here
                status = reply[9:12].decode(errors="replace") if reply else "no answer"
                out[f"slow {kind} closed ({status})"] += 1
                socks.remove(entry)
                s.close()
                continue
            try:
                s.sendall(drip)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                pass
            except OSError:
                out[f"slow {kind} closed (reset)"] += 1
                socks.remove(entry)
    out["still open at the end"] = len(socks)
    for s, _, _ in socks:
        s.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--markdown")
    ap.add_argument("--no-skew", action="store_true", help="replica B keeps the true time")
    args = ap.parse_args()
    skew = LIBFAKETIME.exists() and not args.no_skew
    pg = PgCluster()
    if pg.available:
        print(f"needs PostgreSQL: {pg.available}", file=sys.stderr)
        return 1
    pg.start()
    work = Path(mkdtemp(prefix="shieldml-soak-"))
    SimulatedPlatform.open(work / "sim", clock=fixed_clock(DAY_AGO))
    url = pg.create_database("soak")
    opts = ("--simulated-platform", str(work / "sim"), "--nonce-ttl", str(NONCE_TTL))
    a = start_broker(work / "state", *opts, database=url)
    b = start_broker(work / "state", *opts, database=url, env=skewed(SKEW[0]) if skew else None)
    events: list[str] = []

    def event(text: str) -> None:  # for the report, and shown as it happens
        print(text, file=sys.stderr, flush=True)
        events.append(text)

    try:
        if not skew:
            event(
                "no clock skew" + ("" if LIBFAKETIME.exists() else " (libfaketime not installed)")
            )
        else:
            event(f"replica B's clock {clock_offset(b.url, b.fingerprint) / 3600:+.1f} h")
        with BrokerClient(
            a.url, fingerprint=a.fingerprint, token=a.token_file.read_text().strip()
        ) as c:
            c.add_key("model", "stream", bytes(32))
            c.set_policy("model", POLICY)
        stop = time.time() + args.seconds
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        urls = [(a.url, a.fingerprint), (b.url, b.fingerprint)]
        per = [args.clients // args.procs] * args.procs
        procs = [
            ctx.Process(target=_load, args=(urls, str(work / "sim"), n, stop, queue, i))
            for i, n in enumerate(per)
        ]
        for p in procs:
            p.start()
        slow: dict[str, int] = collections.Counter()
        slow_th = threading.Thread(target=_slowloris, args=(a.url, 128, stop, slow), daemon=True)
        slow_th.start()
        time.sleep(args.seconds / 4)
        pg.restart()
        event(f"t={args.seconds / 4:.0f}s PostgreSQL restarted")
        time.sleep(args.seconds / 4)
        port = int(b.url.rsplit(":", 1)[1])
        b.stop(signal.SIGKILL)
        event(f"t={args.seconds / 2:.0f}s replica B killed with SIGKILL")
        time.sleep(2)
        b = start_broker(
            work / "state", *opts, database=url, port=port, env=skewed(SKEW[1]) if skew else None
        )
        event(
            f"t={args.seconds / 2 + 2:.0f}s replica B restarted"
            + (
                f" with its clock {clock_offset(b.url, b.fingerprint) / 3600:+.1f} h"
                if skew
                else ""
            )
        )
        time.sleep(max(0.0, args.seconds / 4 - 2))
        rotate = [
            sys.executable,
            "-m",
            "shieldml.cli",
            "broker",
            "rotate-kek",
            "--database",
            url,
            "--state",
            str(work / "state"),
        ]
        rc = subprocess.run(rotate, capture_output=True, check=False).returncode
        event(f"t={3 * args.seconds / 4:.0f}s key-encryption key rotated under load (exit {rc})")
        results = [queue.get(timeout=args.seconds + 300) for _ in procs]
        for p in procs:
            p.join()
        slow_th.join(timeout=30)
        with BrokerClient(
            a.url, fingerprint=a.fingerprint, token=a.token_file.read_text().strip()
        ) as c:
            checkpoint = c.audit_checkpoint()["checkpoint"]  # first: the records cover it
            raw, head = c.audit_all()
    finally:
        a.stop()
        b.stop()
        pg.stop()
    ok = sum(r["ok"] for r in results)
    lat = sorted(x for r in results for x in r["lat"])
    errors: collections.Counter[str] = collections.Counter()
    for r in results:
        errors.update(r["errors"])
    nonces = [n for r in results for n in r["nonces"]]
    try:
        verify_log(raw, head)
        chain_ok, why = True, "chain intact"
    except AuditChainError as e:
        chain_ok, why = False, e.message
    try:  # the tree: records 1..N are what the log key (in the state directory) signed for N
        log_key = NoteSigner.load_or_create(work / "state" / "log-signing-key").verifier
        tree = verify_tree([AuditRecord.from_dict(r) for r in raw], checkpoint, [log_key])
        tree_ok, tree_why = True, f"records 1 to {tree.checkpoint.size} match the signed checkpoint"
    except AuditChainError as e:
        tree_ok, tree_why = False, e.message
    audited = [
        x["data"]["nonce_sha256"]
        for x in raw
        if x["event"] == "release" and x["data"].get("allowed")
    ]
    import hashlib

    client_hashes = collections.Counter(
        hashlib.sha256(bytes.fromhex(n)).hexdigest() for n in nonces
    )
    audit_hashes = collections.Counter(audited)
    lost = sum((client_hashes - audit_hashes).values())  # a release the client got, not audited
    duplicated = sum(v - 1 for v in audit_hashes.values() if v > 1)  # one release audited twice
    unacknowledged = sum((audit_hashes - client_hashes).values())  # audited, response cut by a kill
    twice = sum(v - 1 for v in collections.Counter(nonces).values() if v > 1) + sum(
        r["replays_accepted"] + r["stale_accepted"] for r in results
    )
    lines = [
        f"{args.clients} clients ({args.procs} processes) for {args.seconds:.0f} s against 2 broker replicas on one PostgreSQL; "
        + "; ".join(events),
        "",
        "| figure | value |",
        "|---|---:|",
        f"| releases served | {ok} ({ok / args.seconds:.1f}/s) |",
        f"| release latency p50 / p99 (ms) | {lat[len(lat) // 2] * 1e3:.0f} / {lat[int(len(lat) * 0.99) - 1] * 1e3:.0f} |",
        f"| audit chain | {'intact' if chain_ok else 'BROKEN: ' + why} ({len(raw)} records) |",
        f"| audit tree | {'intact: ' if tree_ok else 'BROKEN: '}{tree_why} |",
        f"| audit records lost / duplicated | {lost} / {duplicated} |",
        f"| releases audited whose response the client never got (connection cut by the kill) | {unacknowledged} |",
        f"| nonces accepted twice (replays, expired) | {twice} |",
        f"| slow clients (slowloris) opened / refused / still open at the end | "
        f"{slow['opened']} / {slow['refused']} / {slow['still open at the end']} |",
        *[f"| {k} | {v} |" for k, v in sorted(slow.items()) if k.startswith("slow ")],
        "",
        "| outcome | count |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in sorted(errors.items())],
    ]
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        write_page(Path(args.markdown), table, "soak_broker")
    slow_ok = slow["opened"] > 0 and slow["still open at the end"] == 0
    return (
        0
        if chain_ok and tree_ok and lost == 0 and duplicated == 0 and twice == 0 and slow_ok
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
