"""Write the digits inference job for SGX with Gramine into a directory (a job.toml and its files).

    python examples/digits-sgx/make_job.py sgx-job --broker https://broker.example:8443 --fingerprint <sha256>

The job is the demo's inference program; its protected files are gramine-pf (Gramine decrypts
them itself) under one key, `wrap`, provisioned by the broker's secret-provisioning endpoint.
"""

from __future__ import annotations

import argparse
import hashlib
from importlib import resources
from pathlib import Path


def make_job(out: Path, broker: str, fingerprint: str) -> Path:
    (out / "work").mkdir(parents=True, exist_ok=True)
    lines = [
        "version = 1",
        'tee = "sgx"',
        "",
        "[command]",
        'argv = ["/usr/bin/python3", "infer.py"]',
        'cwd = "work"',
        "",
    ]
    for name in ("digits_net.py", "infer.py"):
        text = resources.files("shieldml.demo").joinpath(f"digits-job/{name}").read_text()
        (out / "work" / name).write_text(text)
        lines += [
            "[[trusted]]",
            f'path = "work/{name}"',
            f'sha256 = "{hashlib.sha256(text.encode()).hexdigest()}"',
            "",
        ]
    lines += [
        "[[broker]]",
        'name = "owner"',
        f'url = "{broker}"',
        f'fingerprint = "{fingerprint}"',
        "",
    ]
    for kind, path, ct in (
        ("input", "/workload/model/", "enc_files/model"),
        ("input", "/workload/data/test_images.pt", "enc_files/test_images.pt"),
        ("output", "/workload/predictions/", "enc_files/predictions"),
    ):
        lines += [
            f"[[{kind}]]",
            f'path = "{path}"',
            f'ciphertext = "{ct}"',
            'key = "wrap"',
            'broker = "owner"',
            'format = "gramine-pf"',
            "",
        ]
    job = out / "job.toml"
    job.write_text("\n".join(lines))
    return job


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--broker", required=True)
    ap.add_argument("--fingerprint", required=True)
    a = ap.parse_args()
    print(make_job(a.out, a.broker, a.fingerprint))
