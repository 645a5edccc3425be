"""The GPU device check: a shielded PyTorch run on the machine's GPU against the same program run
natively, and GPU evidence from the machine's real GPU through NVML.

Meant for a machine with an NVIDIA GPU but no CPU TEE (the lent H200: not in confidential-
computing mode), where it shows two things:

1. **Shielded vs native on CUDA.** A job on the simulated CPU TEE reads an encrypted 64 MB weight
   matrix, multiplies with it on the GPU and writes a sealed result; the same script runs natively
   on the plaintext. Wall times of ``--runs`` interleaved pairs, their medians and ratio.
2. **The GPU outside CC mode is refused.** The same job with ``[gpu]`` and ``[simulated] gpus =
   "nvml"`` (the real GPU's evidence, through ``pynvml``, beside the simulated CPU): the broker
   must refuse with "GPU 0 not in confidential-computing mode", and nothing is decrypted.

Everything runs from a temporary directory: a broker on loopback that trusts the simulated
platform, the owner's keys and policies (``policy init --from-job``), ``shieldml run``. The
result is one JSON document (stdout, and ``--out DIR/gpu_check.json``). Without a GPU (here: CI
machines) the same steps run on the CPU and the evidence step says why NVML gave nothing, so
the script itself is checked where no GPU is: ``python scripts/gpu_device_check.py --runs 1
--steps 5``.

On the device machine (scripts/gpu_device_check.sh installs what its image lacks first)::

    python3 scripts/gpu_device_check.py --runs 3 --out "$OUT"
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = """\
import sys, time, torch
dev = "cuda" if torch.cuda.is_available() else "cpu"
t0 = time.perf_counter()
w = torch.load("model.pt").to(dev)
x = torch.ones(512, w.shape[0], device=dev)
for _ in range(STEPS):
    x = torch.tanh(x @ w / w.shape[0] ** 0.5)
s = float(x.sum())
if dev == "cuda":
    torch.cuda.synchronize()
name = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
import os
os.makedirs("out", exist_ok=True)
with open("out/result.txt", "w") as f:
    f.write(f"{dev} {name} {s:.6e} {time.perf_counter() - t0:.3f}\\n")
print(dev, name, f"{s:.6e}")
"""


def cli(
    *args: str, cwd: Path, env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "shieldml.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and r.returncode != 0:
        raise SystemExit(f"shieldml {' '.join(args)}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def run_report(stderr: str) -> dict[str, Any]:
    """``shieldml run --json``'s report: the last line of its standard error."""
    for line in reversed(stderr.splitlines()):
        if line.startswith("{"):
            doc: dict[str, Any] = json.loads(line)
            return doc
    return {}


def job(work: Path, name: str, env: dict[str, str], gpu: bool, program: str) -> Path:
    """A job directory with infer.py, the manifest (simulated TEE; with ``gpu``: [gpu] and the
    real GPUs through NVML) and the owner's policy set on both keys."""
    d = work / name
    d.mkdir()
    (d / "infer.py").write_text(program)
    cli("encrypt", str(work / "native" / "model.pt"), "enc/model.pt.enc", "--key", "../model.key",
        "--bind", str(d / "model.pt"), cwd=d, env=env)  # fmt: skip
    args = ["job", "init", "infer.py", "--tee", "simulated", "--simulated-platform", str(work / "sim"),
            "--input", "model.pt=enc/model.pt.enc", "--input-key", "model",
            "--output", "out/=sealed", "--output-key", "results", "--key-file", "../model.key"]  # fmt: skip
    cli(*args, *(["--gpus", "1"] if gpu else []), cwd=d, env=env)
    if gpu:
        text = (d / "job.toml").read_text().replace('gpus = "1"', 'gpus = "nvml"')
        (d / "job.toml").write_text(text)
    cli("policy", "init", "--from-job", "job.toml", "-o", "policy.toml", cwd=d, env=env)
    for key in ("model", "results"):
        cli("broker", "policy", "set", key, "policy.toml", cwd=d, env=env)
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="interleaved shielded/native pairs")
    ap.add_argument("--out", type=Path, help="write gpu_check.json there")
    ap.add_argument("--steps", type=int, default=200, help="matrix products per run (CPU: few)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from shieldml.testing.brokers import start_broker

    result: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    with tempfile.TemporaryDirectory(prefix="shieldml-gpu-check-") as tmp:
        work = Path(tmp)
        broker = start_broker(work / "broker", "--simulated-platform", str(work / "sim"))
        try:
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT / "src"),
                "SHIELDML_HOME": str(work / "home"),
                "SHIELDML_BROKER_URL": broker.url,
                "SHIELDML_BROKER_FINGERPRINT": broker.fingerprint,
                "SHIELDML_BROKER_TOKEN": broker.token_file.read_text().strip(),
            }
            torch.manual_seed(0)
            native = work / "native"
            native.mkdir()
            torch.save(torch.randn(4096, 4096), native / "model.pt")  # 64 MiB of weights
            program = PROGRAM.replace("STEPS", str(a.steps))
            (native / "infer.py").write_text(program)
            for key in ("model", "results"):
                cli("key", "new", f"{key}.key", cwd=work, env=env)
                cli("broker", "key", "add", key, "--key", f"{key}.key", cwd=work, env=env)
            plain = job(work, "plain", env, gpu=False, program=program)
            shielded_s, native_s, phases = [], [], []
            for _ in range(a.runs):
                t = time.perf_counter()
                r = cli("run", "-m", "job.toml", "--json", cwd=plain, env=env, check=False)
                shielded_s.append(time.perf_counter() - t)
                if r.returncode != 0:
                    result["shielded_error"] = (r.stdout + r.stderr)[-2000:]
                    break
                phases.append(run_report(r.stderr).get("times"))
                t = time.perf_counter()
                subprocess.run([sys.executable, "infer.py"], cwd=native, check=True,
                               capture_output=True, timeout=600)  # fmt: skip
                native_s.append(time.perf_counter() - t)
            if native_s:
                cli("decrypt", "sealed", "opened", "--key", "../results.key", "--bind",
                    str(plain / "out"), cwd=plain, env=env)  # fmt: skip
                result["shielded_result"] = (plain / "opened" / "result.txt").read_text().strip()
                result["native_result"] = (native / "out" / "result.txt").read_text().strip()
                result["same_sum"] = (
                    result["shielded_result"].split()[-2] == result["native_result"].split()[-2]
                )
                result["shielded_s"] = [round(x, 3) for x in shielded_s]
                result["native_s"] = [round(x, 3) for x in native_s]
                result["ratio_median"] = round(
                    statistics.median(shielded_s) / statistics.median(native_s), 3
                )
                result["shielded_phases_last"] = phases[-1]
            gpu = job(work, "gpu", env, gpu=True, program=program)
            r = cli("run", "-m", "job.toml", cwd=gpu, env=env, check=False)
            result["gpu_evidence_exit_code"] = r.returncode
            result["gpu_evidence_output"] = (r.stdout + r.stderr)[-2000:]
            result["refused_not_in_cc_mode"] = (
                r.returncode != 0 and "not in confidential-computing mode" in r.stdout + r.stderr
            )
            result["nothing_decrypted"] = not (gpu / "sealed").exists()
        finally:
            broker.stop()
    text = json.dumps(result, indent=1)
    print(text)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "gpu_check.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
