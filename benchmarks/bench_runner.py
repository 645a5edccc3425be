"""The same PyTorch inference natively and under ``shieldml run`` (simulated TEE, broker on loopback).

Steady state: the script times its own inference loop, so both runs report the loop time of the
same code on the same data; the ratio is the runner's steady-state overhead. Start-up: the
runner's phases (measure, attestation + key release, decryption of the inputs, sealing). Medians
of ``--runs`` interleaved native/shielded pairs. Needs root (mount namespaces) and torch.
Run: ``python benchmarks/bench_runner.py [--runs 5] [--model-mib 256]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from tests.runner.conftest import policy_for, write_manifest  # noqa: E402

from bench_files import write_page  # noqa: E402
from shieldml.broker.client import BrokerClient  # noqa: E402
from shieldml.files import encrypt_file, generate_key  # noqa: E402
from shieldml.runner.manifest import JobManifest  # noqa: E402
from shieldml.runner.run import run_job  # noqa: E402
from shieldml.testing.brokers import start_broker  # noqa: E402
from shieldml.testing.simulated import SimulatedPlatform, system_clock  # noqa: E402

INFER = """\
import time, torch
torch.set_num_threads(1)
state = torch.load("model.pt", weights_only=True)
layers = [state[f"w{i}"] for i in range(len(state))]
x = torch.load("input.pt", weights_only=True)
for _ in range(3):  # warm-up
    h = x
    for w in layers:
        h = torch.relu(h @ w)
t = time.perf_counter()
for _ in range(ITERS):
    h = x
    for w in layers:
        h = torch.relu(h @ w)
loop = time.perf_counter() - t
open("result.txt", "w").write(f"{loop}\\n{h.sum().item()}\\n")
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model-mib", type=int, default=256)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--markdown")
    args = ap.parse_args()
    import torch

    work = Path(tempfile.mkdtemp(prefix="shieldml-bench-runner-"))
    sim_dir = work / "sim"
    SimulatedPlatform.open(sim_dir, clock=system_clock)
    bp = start_broker(work / "broker", "--simulated-platform", str(sim_dir))
    try:
        native = work / "native"
        native.mkdir()
        script = INFER.replace("ITERS", str(args.iters))
        (native / "infer.py").write_text(script)
        dim = 1024
        n_layers = max(1, args.model_mib * (1 << 20) // (dim * dim * 4))
        torch.manual_seed(0)
        torch.save(
            {f"w{i}": torch.randn(dim, dim) / dim**0.5 for i in range(n_layers)},
            native / "model.pt",
        )
        torch.save(torch.randn(64, dim), native / "input.pt")
        job = work / "job"
        (job / "work").mkdir(parents=True)
        (job / "enc").mkdir()
        (job / "work" / "infer.py").write_text(script)
        key, out_key = generate_key(), generate_key()
        w = (job / "work").resolve()
        for name in ("model.pt", "input.pt"):
            encrypt_file(native / name, job / "enc" / f"{name}.enc", key, bind=str(w / name))
        manifest = write_manifest(
            job, bp, sim_dir, argv=[sys.executable, "infer.py"], trusted=["work/infer.py"],
            inputs=[("model.pt", "enc/model.pt.enc", "model"), ("input.pt", "enc/input.pt.enc", "model")],
            outputs=[("result.txt", "out/result.txt.enc", "results")],
        )  # fmt: skip
        digest = JobManifest.load(manifest).workload_digest()
        policy = policy_for(digest)
        with BrokerClient(
            bp.url, fingerprint=bp.fingerprint, token=bp.token_file.read_text().strip()
        ) as c:
            c.add_key("model", "stream", key)
            c.add_key("results", "stream", out_key)
            c.set_policy("model", policy)
            c.set_policy("results", policy)
        from shieldml.files import open_protected

        rows: dict[str, list[float]] = {
            k: []
            for k in (
                "native_loop",
                "shielded_loop",
                "native_total",
                "shielded_total",
                "measure_s",
                "attest_release_s",
                "root_s",
                "decrypt_s",
                "decrypt_gbps",
                "seal_s",
            )
        }
        for _ in range(args.runs):
            t = time.perf_counter()
            subprocess.run([sys.executable, "infer.py"], cwd=native, check=True)
            rows["native_total"].append(time.perf_counter() - t)
            rows["native_loop"].append(float((native / "result.txt").read_text().split()[0]))
            stats: dict[str, float] = {}
            t = time.perf_counter()
            assert run_job(manifest, stats=stats) == 0
            rows["shielded_total"].append(time.perf_counter() - t)
            with open_protected(
                job / "out" / "result.txt.enc", out_key, bind=str(w / "result.txt")
            ) as f:
                rows["shielded_loop"].append(float(f.read().decode().split()[0]))
            for k in ("measure_s", "attest_release_s", "root_s", "decrypt_s", "seal_s"):
                rows[k].append(stats[k])
            rows["decrypt_gbps"].append(stats["decrypted_bytes"] / stats["decrypt_s"] / 1e9)
    finally:
        bp.stop()
    med = {k: statistics.median(v) for k, v in rows.items()}
    size_mb = (native / "model.pt").stat().st_size / 1e6
    lines = [
        f"PyTorch MLP inference, {size_mb:.0f} MB model, {args.iters} iterations, median of {args.runs} interleaved pairs",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| steady-state loop, native (s) | {med['native_loop']:.3f} |",
        f"| steady-state loop, shielded (s) | {med['shielded_loop']:.3f} |",
        f"| steady-state overhead | {100 * (med['shielded_loop'] / med['native_loop'] - 1):+.1f}% |",
        f"| whole run, native (s) | {med['native_total']:.2f} |",
        f"| whole run, shielded (s) | {med['shielded_total']:.2f} |",
        f"| start-up: read and measure trusted files (s) | {med['measure_s']:.3f} |",
        f"| start-up: private root (trusted copies, host entries bound) (s) | {med['root_s']:.3f} |",
        f"| start-up: attestation + key release (s) | {med['attest_release_s']:.3f} |",
        f"| start-up: decrypt inputs into tmpfs (s) | {med['decrypt_s']:.3f} |",
        f"| decryption throughput (GB/s) | {med['decrypt_gbps']:.2f} |",
        f"| seal outputs (s) | {med['seal_s']:.3f} |",
    ]
    table = "\n".join(lines)
    print(table)
    print(json.dumps(rows), file=sys.stderr)
    if args.markdown:
        write_page(Path(args.markdown), table, "bench_runner")
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("the decrypted view needs root here", file=sys.stderr)
        sys.exit(1)
    sys.exit(main())
