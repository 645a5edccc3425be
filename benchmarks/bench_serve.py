"""Online inference behind attested TLS: the digits server (examples/serving) direct on
loopback vs through ``shieldml serve`` (Python transport, and ``shieldml proxy``), in one run.

Four ways to reach the same FastAPI/uvicorn program, interleaved round by round (``--rounds``,
medians over them): direct plain HTTP, direct TLS (uvicorn's own TLS, the baseline the goal
names), ``shieldml serve`` with :class:`shieldml.client.AttestedTransport`, and ``shieldml
proxy`` in front of ``shieldml serve``. Each round runs ``--clients`` threads (16), each with its
own keep-alive httpx client, POSTing /predict for ``--seconds``. Then the cost of a new attested
connection (TLS handshake + fresh evidence + verification) against a plain TLS handshake.

Simulated SGX TEE, one broker on loopback. Run: ``python benchmarks/bench_serve.py [--write]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from shieldml.broker.client import BrokerClient
from shieldml.client import AttestedTransport, AttestingBackend, Verifier
from shieldml.files import encrypt_file, generate_key
from shieldml.policy import Policy
from shieldml.runner.manifest import JobManifest
from shieldml.testing import free_port, start_broker
from shieldml.testing.simulated import SimulatedPlatform, system_clock

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "serving"
sys.path.insert(0, str(EXAMPLE))
sys.path.insert(0, str(HERE))
from make_job import make_job  # noqa: E402


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 120) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not start")


def load(make_client, url: str, body: dict[str, object], clients: int, seconds: float):  # type: ignore[no-untyped-def]
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0]
    go = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        with make_client() as c:
            c.post(url + "/predict", json=body).raise_for_status()  # connect (and attest) first
            go.wait()
            while (t := time.perf_counter()) < stop_at[0]:
                r = c.post(url + "/predict", json=body)
                if r.status_code != 200:
                    errors[0] += 1
                lat[i].append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds + 1e9  # set for real once everyone is connected
    go.wait()
    start = time.perf_counter()
    stop_at[0] = start + seconds
    for t in threads:
        t.join()
    flat = sorted(x for xs in lat for x in xs)
    n = len(flat)
    return {
        "rps": n / seconds,
        "p50_ms": flat[n // 2] * 1e3,
        "p99_ms": flat[min(n - 1, int(n * 0.99))] * 1e3,
        "errors": errors[0],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connects", type=int, default=20)
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    a = ap.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        sim = tmp / "sim"
        plat = SimulatedPlatform.open(sim, clock=system_clock)
        bp = start_broker(tmp / "broker", "--simulated-platform", str(sim))
        subprocess.run([sys.executable, str(EXAMPLE / "train.py"), str(tmp / "owner")], check=True)
        job_dir = tmp / "job"
        sport = free_port()
        manifest = make_job(job_dir, bp.url, bp.fingerprint, platform=str(sim), port=sport)
        key = generate_key()
        (job_dir / "enc").mkdir()
        encrypt_file(
            str(tmp / "owner" / "model" / "model.pt"),
            str(job_dir / "enc" / "model.pt.enc"),
            key,
            bind=str((job_dir / "work" / "model" / "model.pt").resolve()),
        )
        digest = JobManifest.load(manifest).workload_digest()
        policy = "\n".join(
            [
                "[[profile]]",
                'tee = "sgx"',
                f'mrenclave = ["{"5e" * 32}"]',
                'mrsigner = "any"',
                "isv_prod_id = 0",
                "min_isv_svn = 0",
                f'workload_digest = ["{digest}"]',
                "insecure_allow_simulated = true",
                "",
            ]
        )
        (tmp / "policy.toml").write_text(policy)
        with BrokerClient(
            bp.url, fingerprint=bp.fingerprint, token=bp.token_file.read_text().strip()
        ) as c:
            c.add_key("model", "stream", key)
            c.set_policy("model", policy)
        # direct: the same program on the plaintext model, outside any TEE
        direct = tmp / "direct"
        (direct / "model").mkdir(parents=True)
        for name in ("server.py", "digits_mlp.py"):
            (direct / name).write_bytes((EXAMPLE / name).read_bytes())
        (direct / "model" / "model.pt").write_bytes(
            (tmp / "owner" / "model" / "model.pt").read_bytes()
        )
        dport, tport = free_port(), free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs.append(
            subprocess.Popen([sys.executable, "server.py", str(dport)], cwd=direct, env=env)
        )
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                str(tmp / "k.pem"),
                "-out",
                str(tmp / "c.pem"),
                "-days",
                "1",
                "-subj",
                "/CN=direct",
            ],
            check=True,
            capture_output=True,
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "server:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(tport),
                    "--ssl-keyfile",
                    str(tmp / "k.pem"),
                    "--ssl-certfile",
                    str(tmp / "c.pem"),
                    "--log-level",
                    "warning",
                ],
                cwd=direct,
                env=env,
            )
        )
        pport, xport = free_port(), free_port()
        cli = [sys.executable, "-m", "shieldml.cli"]
        procs.append(
            subprocess.Popen([*cli, "serve", "-m", str(manifest), "--listen", f"127.0.0.1:{pport}"])
        )
        wait_port(dport, procs[0], "direct server")
        wait_port(tport, procs[1], "direct TLS server")
        wait_port(pport, procs[2], "shieldml serve")
        procs.append(
            subprocess.Popen(
                [
                    *cli,
                    "proxy",
                    "--upstream",
                    f"https://127.0.0.1:{pport}",
                    "--policy",
                    str(tmp / "policy.toml"),
                    "--listen",
                    f"127.0.0.1:{xport}",
                    "--simulated-platform",
                    str(sim),
                    "--reattest-interval",
                    "0",
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        wait_port(xport, procs[3], "shieldml proxy")
        trust = plat.trust()
        verifier = Verifier(Policy.from_toml(policy), trust=trust)
        sample = json.loads((tmp / "owner" / "samples.json").read_text())[0]
        body = {"pixels": sample["pixels"]}
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        variants = {
            "direct, plain HTTP": (
                lambda: httpx.Client(limits=limits),
                f"http://127.0.0.1:{dport}",
            ),
            "direct, TLS (uvicorn)": (
                lambda: httpx.Client(verify=False, limits=limits),
                f"https://127.0.0.1:{tport}",
            ),
            "shieldml serve + AttestedTransport": (
                lambda: httpx.Client(transport=AttestedTransport(verifier, limits=limits)),
                f"https://127.0.0.1:{pport}",
            ),
            "shieldml serve + shieldml proxy": (
                lambda: httpx.Client(limits=limits),
                f"http://127.0.0.1:{xport}",
            ),
        }
        results: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
        for rnd in range(a.rounds):
            for name, (make, url) in variants.items():
                results[name].append(load(make, url, body, a.clients, a.seconds))
                print(f"round {rnd + 1} {name}: {results[name][-1]}", file=sys.stderr)
        med = {
            k: {
                m: statistics.median(r[m] for r in rs)
                for m in ("rps", "p50_ms", "p99_ms", "errors")
            }
            for k, rs in results.items()
        }
        # a new connection: plain TLS handshake vs TLS + fresh evidence + verification
        import socket
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

        def plain_tls() -> float:
            t = time.perf_counter()
            with socket.create_connection(("127.0.0.1", tport)) as s, ctx.wrap_socket(s):
                pass
            return time.perf_counter() - t

        def attested() -> float:
            b = AttestingBackend(verifier)
            t = time.perf_counter()
            s = b.connect_tcp("127.0.0.1", pport).start_tls(b.ssl_context, "127.0.0.1")
            dt = time.perf_counter() - t
            s.close()
            return dt

        tls_ms = statistics.median(plain_tls() for _ in range(a.connects)) * 1e3
        att_ms = statistics.median(attested() for _ in range(a.connects)) * 1e3
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        with __import__("contextlib").suppress(Exception):
            bp.stop()
    base, tls = med["direct, plain HTTP"]["rps"], med["direct, TLS (uvicorn)"]["rps"]
    rows = [
        "| path | requests/s | vs direct | vs direct TLS | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k, m in med.items():
        rows.append(
            f"| {k} | {m['rps']:.0f} | {m['rps'] / base:.2f}x | {m['rps'] / tls:.2f}x | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} |"
        )
    rows += [
        "",
        f"New connection, median of {a.connects}: plain TLS handshake {tls_ms:.1f} ms; attested "
        f"(TLS + fresh evidence + verification) {att_ms:.1f} ms.",
        "",
        f"{a.clients} clients with keep-alive, {a.seconds:g} s per round, medians of {a.rounds} "
        f"interleaved rounds; {os.cpu_count()} CPUs; model digest "
        f"{hashlib.sha256((tmp / 'owner' / 'model' / 'model.pt').read_bytes()).hexdigest()[:12]}.",
    ]
    table = "\n".join(rows)
    print(table)
    if a.write:
        from bench_files import write_page

        write_page(HERE.parent / "docs" / "benchmarks.md", table, "bench_serve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
