from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shieldml.broker.client import BrokerClient
from shieldml.files import encrypt_file, generate_key
from shieldml.runner.manifest import JobManifest
from shieldml.testing.brokers import BrokerProcess, start_broker
from tests.conftest import sgx_policy

MRENCLAVE = "7e" * 32

SCRIPT = """\
import sys
model = open("model.bin", "rb").read()
data = open("input.txt").read()
with open("result.txt", "w") as f:
    f.write(f"{len(model)} {sum(model) % 9973} {data.upper()}")
sys.exit(int(data.strip() == "fail") * 3)
"""


@dataclass
class Job:
    dir: Path
    manifest: Path
    broker: BrokerProcess
    model_key: bytes
    result_key: bytes
    sim_dir: Path

    def admin(self) -> BrokerClient:
        return BrokerClient(
            self.broker.url,
            fingerprint=self.broker.fingerprint,
            token=self.broker.token_file.read_text().strip(),
        )

    def policy(self, digest: str, **extra: str) -> str:
        return policy_for(digest, **extra)

    def authorize(self) -> str:
        digest = JobManifest.load(self.manifest).workload_digest()
        with self.admin() as c:
            for name in ("model", "results"):
                c.set_policy(name, self.policy(digest))
        return digest


def policy_for(digest: str, **extra: str) -> str:
    """A policy accepting the simulated enclave MRENCLAVE running the job with ``digest``."""
    return sgx_policy(bytes.fromhex(MRENCLAVE), f'["{digest}"]', **extra)


def write_manifest(
    d: Path,
    broker: BrokerProcess,
    sim_dir: Path,
    *,
    argv: list[str],
    trusted: list[str],
    inputs: list[tuple[str, str, str]],
    outputs: list[tuple[str, str, str]],
    debug: bool = False,
) -> Path:
    import hashlib

    parts = [
        "version = 1", 'tee = "simulated"', "", "[command]", f"argv = {argv!r}".replace("'", '"'), 'cwd = "work"', "",
        "[env]", 'allow = ["LANG"]', "",
    ]  # fmt: skip
    for t in trusted:
        parts += [
            "[[trusted]]",
            f'path = "{t}"',
            f'sha256 = "{hashlib.sha256((d / t).read_bytes()).hexdigest()}"',
            "",
        ]
    parts += [
        "[[broker]]",
        'name = "owner"',
        f'url = "{broker.url}"',
        f'fingerprint = "{broker.fingerprint}"',
        "",
    ]
    for table, files in (("input", inputs), ("output", outputs)):
        for path, ct, key in files:
            parts += [
                f"[[{table}]]",
                f'path = "{path}"',
                f'ciphertext = "{ct}"',
                f'key = "{key}"',
                'broker = "owner"',
                "",
            ]
    parts += [
        "[simulated]",
        f'platform = "{sim_dir}"',
        'kind = "sgx"',
        f'mrenclave = "{MRENCLAVE}"',
        f'debug = "{str(debug).lower()}"',
    ]
    m = d / "job.toml"
    m.write_text("\n".join(parts) + "\n")
    return m


@pytest.fixture
def job(tmp_path: Path, sim_dir: Path) -> Iterator[Job]:
    bp = start_broker(tmp_path / "broker", "--simulated-platform", str(sim_dir))
    d = tmp_path / "job"
    (d / "work").mkdir(parents=True)
    (d / "enc").mkdir()
    (d / "work" / "app.py").write_text(SCRIPT)
    model, result = generate_key(), generate_key()
    work = (d / "work").resolve()
    encrypt_file_plain(
        d / "model.plain",
        bytes(range(256)) * 64 + b"MODEL-MARKER-1234",
        d / "enc" / "model.bin.enc",
        model,
        str(work / "model.bin"),
    )
    encrypt_file_plain(
        d / "input.plain",
        b"hello shielded world INPUT-MARKER",
        d / "enc" / "input.txt.enc",
        model,
        str(work / "input.txt"),
    )
    manifest = write_manifest(
        d, bp, sim_dir, argv=[sys.executable, "app.py"], trusted=["work/app.py"],
        inputs=[("model.bin", "enc/model.bin.enc", "model"), ("input.txt", "enc/input.txt.enc", "model")],
        outputs=[("result.txt", "out/result.txt.enc", "results")],
    )  # fmt: skip
    with BrokerClient(
        bp.url, fingerprint=bp.fingerprint, token=bp.token_file.read_text().strip()
    ) as c:
        c.add_key("model", "stream", model)
        c.add_key("results", "stream", result)
    yield Job(d, manifest, bp, model, result, sim_dir)
    bp.stop()


def encrypt_file_plain(plain: Path, data: bytes, out: Path, key: bytes, bind: str) -> None:
    plain.write_bytes(data)
    encrypt_file(plain, out, key, bind=bind, overwrite=True)
    plain.unlink()


__all__ = ["SCRIPT", "Job", "textwrap"]
