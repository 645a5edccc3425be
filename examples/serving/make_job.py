"""Write the digits server job (job.toml + its files) for `shieldml serve`.

    python examples/serving/make_job.py serve-job --broker https://127.0.0.1:8443 \\
        --fingerprint <sha256> [--tee simulated --simulated-platform sim-platform] [--port 8000]

The program is server.py (FastAPI + uvicorn) with digits_mlp.py: trusted files, measured into
the workload digest. Its model is a protected input, `model/model.pt`, decrypted into the
private root with the key `model` of the broker `owner`.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_job(
    out: Path,
    broker: str,
    fingerprint: str,
    *,
    tee: str = "simulated",
    platform: str = "sim-platform",
    port: int = 8000,
    python: str = sys.executable,
) -> Path:
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    lines = [
        "version = 1", f'tee = "{tee}"', "", "[command]",
        f'argv = ["{Path(python).absolute()}", "server.py", "{port}"]', 'cwd = "work"', "",
        "[env]", 'set = { OMP_NUM_THREADS = "1", HOME = "/nonexistent" }', "",
    ]  # fmt: skip
    for name in ("server.py", "digits_mlp.py"):
        shutil.copyfile(HERE / name, work / name)
        digest = hashlib.sha256((work / name).read_bytes()).hexdigest()
        lines += ["[[trusted]]", f'path = "work/{name}"', f'sha256 = "{digest}"', ""]
    lines += [
        "[[broker]]", 'name = "owner"', f'url = "{broker}"', f'fingerprint = "{fingerprint}"', "",
        "[[input]]", 'path = "model/model.pt"', 'ciphertext = "enc/model.pt.enc"', 'key = "model"',
        'broker = "owner"', "",
        "[serve]", f"port = {port}", 'ready_path = "/health"', "ready_timeout = 120", "",
    ]  # fmt: skip
    if tee == "simulated":
        lines += [
            "[simulated]",
            f'platform = "{platform}"',
            'kind = "sgx"',
            f'mrenclave = "{"5e" * 32}"',
            "",
        ]
    job = out / "job.toml"
    job.write_text("\n".join(lines))
    return job


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", type=Path)
    ap.add_argument("--broker", required=True)
    ap.add_argument("--fingerprint", required=True)
    ap.add_argument("--tee", default="simulated")
    ap.add_argument("--simulated-platform", default="sim-platform")
    ap.add_argument("--port", type=int, default=8000)
    a = ap.parse_args()
    print(
        make_job(
            a.out, a.broker, a.fingerprint, tee=a.tee, platform=a.simulated_platform, port=a.port
        )
    )
