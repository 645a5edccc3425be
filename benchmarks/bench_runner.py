"""The same PyTorch inference natively and under ``shieldml run`` (simulated TEE, broker on loopback).

Steady state: the script times its own inference loop, so both runs report the loop time of the
same code on the same data; the ratio is the runner's steady-state overhead. Start-up: the
runner's phases (measure, attestation + key release, decryption of the inputs, sealing). Medians
of ``--runs`` interleaved native/shielded pairs. Needs root (mount namespaces) and torch.
Whole run (``--whole``): Gramine's tutorial as issue 19 tried it. A stock PyTorch script (loads a
``torch.save``d model and an input from its working directory, writes a result) runs natively
(``python infer.py``) and under ``shieldml run -m job.toml --receipt r.json`` (the CLI, a process
of its own, as an operator starts it) on gramine-pf files bound to relative stored paths as
Gramine's ``pf-crypt`` writes them (``bind``). Wall time and CPU time (user + system, the whole
process tree) of each, their ratio and difference, and the runner's phases; medians of
``--runs`` interleaved pairs.
Run: ``python benchmarks/bench_runner.py [--runs 5] [--model-mib 256] [--whole-only]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from tests.runner.conftest import MRENCLAVE, policy_for, write_manifest  # noqa: E402

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
    ap.add_argument("--whole-model-mb", type=int, default=245, help="the whole-run job's model")
    ap.add_argument("--whole-only", action="store_true", help="only the whole-run comparison")
    args = ap.parse_args()
    import torch

    if args.whole_only:
        table = whole_run(args)
        print(table)
        if args.markdown:
            write_page(Path(args.markdown), table, "bench_runner_whole")
        return 0

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
    whole = whole_run(args)
    print(whole)
    if args.markdown:
        write_page(Path(args.markdown), table, "bench_runner")
        write_page(Path(args.markdown), whole, "bench_runner_whole")
    return 0


STOCK = """\
import torch
state = torch.load("model.pt", weights_only=True)
x = torch.load("input.pt", weights_only=True)
h = x
for i in range(len(state)):
    h = torch.relu(h @ state[f"w{i}"])
with open("result.txt", "w") as f:
    f.write(" ".join(f"{v:.6f}" for v in h.sum(dim=1).tolist()) + "\\n")
"""


def _timed(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None
) -> tuple[float, float, str]:
    """Wall and CPU seconds (user + system of the process and everything it waited for)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stderr


def whole_run(args: argparse.Namespace) -> str:
    import torch

    from shieldml.files import Format, decrypt_file

    work = Path(tempfile.mkdtemp(prefix="shieldml-bench-whole-"))
    sim_dir = work / "sim"
    SimulatedPlatform.open(sim_dir, clock=system_clock)
    bp = start_broker(work / "broker", "--simulated-platform", str(sim_dir))
    try:
        native, job = work / "native", work / "job"
        (job / "app").mkdir(parents=True)
        native.mkdir()
        for d in (native, job / "app"):
            (d / "infer.py").write_text(STOCK)
        dim = 1024
        n_layers = max(1, args.whole_model_mb * 1_000_000 // (dim * dim * 4))
        torch.manual_seed(0)
        torch.save(
            {f"w{i}": torch.randn(dim, dim) * (2**0.5 / dim**0.5) for i in range(n_layers)},
            native / "model.pt",
        )
        torch.save(torch.randn(8, dim), native / "input.pt")
        key = generate_key(Format.GRAMINE_PF)
        (work / "wrap_key").write_bytes(key)
        for name in ("model.pt", "input.pt"):  # as `pf-crypt encrypt -o NAME` run in app/ writes
            encrypt_file(native / name, job / "app" / name, key, bind=name, fmt=Format.GRAMINE_PF)
        env = {**os.environ, "SHIELDML_BROKER_URL": bp.url}
        env["SHIELDML_BROKER_FINGERPRINT"] = bp.fingerprint
        env["PYTHONPATH"] = str(ROOT / "src")
        shieldml = [sys.executable, "-m", "shieldml.cli"]
        subprocess.run(
            [*shieldml, "job", "init", "app/infer.py", "--simulated-platform", str(sim_dir),
             "--input", "app/model.pt", "--input", "app/input.pt", "--output", "app/result.txt",
             "--key-file", str(work / "wrap_key"), "--input-key", "wrap", "--output-key", "wrap"],
            cwd=job, env=env, check=True, capture_output=True,
        )  # fmt: skip
        text = (job / "job.toml").read_text()  # the simulated enclave the test policy accepts
        (job / "job.toml").write_text(
            text.replace('kind = "sgx"', f'kind = "sgx"\nmrenclave = "{MRENCLAVE}"')
        )
        digest = JobManifest.load(job / "job.toml").workload_digest()
        with BrokerClient(
            bp.url, fingerprint=bp.fingerprint, token=bp.token_file.read_text().strip()
        ) as c:
            c.add_key("wrap", "gramine-pf", key)
            c.set_policy("wrap", policy_for(digest))
        rows: dict[str, list[float]] = {}
        run_cmd = [*shieldml, "run", "-m", "job.toml", "--receipt", "r.json", "--json"]
        os.sync()  # the set-up wrote the model twice: its write-back is not part of any run
        for _ in range(args.runs):
            w, c, _err = _timed([sys.executable, "infer.py"], native)
            rows.setdefault("native_wall", []).append(w)
            rows.setdefault("native_cpu", []).append(c)
            w, c, err = _timed(run_cmd, job, env)
            rows.setdefault("shielded_wall", []).append(w)
            rows.setdefault("shielded_cpu", []).append(c)
            rep = json.loads(err.strip().splitlines()[-1])
            for k, v in rep["times"].items():
                rows.setdefault(k, []).append(float(v))
            rows.setdefault("ratio_wall", []).append(
                rows["shielded_wall"][-1] / rows["native_wall"][-1]
            )
            rows.setdefault("overhead_wall", []).append(
                rows["shielded_wall"][-1] - rows["native_wall"][-1]
            )
            rows.setdefault("overhead_cpu", []).append(
                rows["shielded_cpu"][-1] - rows["native_cpu"][-1]
            )
        decrypt_file(job / "app" / "result.txt", work / "result.plain", key, bind=str((job / "app" / "result.txt").resolve()))  # fmt: skip
        same = (work / "result.plain").read_bytes() == (native / "result.txt").read_bytes()
        size_mb = (native / "model.pt").stat().st_size / 1e6
    finally:
        bp.stop()
        shutil.rmtree(work, ignore_errors=True)  # two copies of the model: do not leave them
    med = {k: statistics.median(v) for k, v in rows.items()}
    lines = [
        f"Stock PyTorch script, {size_mb:.0f} MB model (torch.save), gramine-pf inputs bound to relative stored paths, `shieldml run --receipt` (CLI) against `python infer.py`; median of {args.runs} interleaved pairs; owner's result byte-identical to native: {'yes' if same else 'NO'}",
        "",
        "| figure | native | shielded | shielded/native | shielded minus native |",
        "|---|---:|---:|---:|---:|",
        f"| whole run, wall (s) | {med['native_wall']:.2f} | {med['shielded_wall']:.2f} | {med['ratio_wall']:.2f}x | {med['overhead_wall']:+.2f} |",
        f"| whole run, CPU: user + system (s) | {med['native_cpu']:.2f} | {med['shielded_cpu']:.2f} | {med['shielded_cpu'] / med['native_cpu']:.2f}x | {med['overhead_cpu']:+.2f} |",
        "",
        "| runner phase (median, s) | |",
        "|---|---:|",
    ]
    for key, name in (
        ("measure_s", "measure trusted files"),
        ("attest_release_s", "attestation + key release"),
        ("root_s", "private root"),
        ("decrypt_s", "copy, hash and decrypt the inputs"),
        ("program_s", "the program"),
        ("seal_s", "seal the output"),
        ("receipt_s", "receipt (second evidence)"),
        ("total_s", "runner, from manifest to receipt"),
    ):
        lines.append(f"| {name} | {med[key]:.3f} |")
    lines.append(
        f"| process start and exit (wall minus runner) | {med['shielded_wall'] - med['total_s']:.3f} |"
    )
    print(json.dumps(rows), file=sys.stderr)
    return "\n".join(lines)


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("the decrypted view needs root here", file=sys.stderr)
        sys.exit(1)
    sys.exit(main())
