"""SIGKILL at random points while outputs are sealed: each output is the previous complete
ciphertext or the new complete one, never partial, never plaintext."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from shieldml.files import open_protected
from tests.runner.conftest import Job

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)
SIZE = 24 << 20


def test_sigkill_while_sealing(job: Job):
    app = job.dir / "work" / "app.py"
    app.write_text(
        "import sys\n"
        "v = open('input.txt').read().strip()\n"
        f"block = (v + '|').encode() * ({SIZE} // (len(v) + 1))\n"
        "open('result.txt', 'wb').write(block)\n"
    )
    text = job.manifest.read_text()
    old = text.split('sha256 = "')[1].split('"')[0]
    job.manifest.write_text(text.replace(old, hashlib.sha256(app.read_bytes()).hexdigest()))
    from tests.runner.conftest import encrypt_file_plain

    work = (job.dir / "work").resolve()
    out = job.dir / "out" / "result.txt.enc"
    bind = str(work / "result.txt")
    rng = random.Random(7)
    versions = []
    killed = 0
    for i in range(8):
        version = f"version-{i}"
        versions.append(version)
        encrypt_file_plain(
            job.dir / "p",
            version.encode(),
            job.dir / "enc" / "input.txt.enc",
            job.model_key,
            str(work / "input.txt"),
        )
        job.authorize() if i == 0 else None
        proc = subprocess.Popen([sys.executable, "-m", "shieldml.cli", "run", "-m", str(job.manifest)], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if (
                any(p.name.endswith(".partial") for p in (job.dir / "out").glob(".*"))
                if (job.dir / "out").exists()
                else False
            ):
                time.sleep(rng.uniform(0, 0.05))
                os.killpg(proc.pid, signal.SIGKILL)
                killed += 1
                break
            time.sleep(0.002)
        proc.wait()
        if out.exists():
            with open_protected(out, job.result_key, bind=bind) as f:
                data = f.read()  # complete and authentic, or IntegrityError would fail the test
            assert len(data) == SIZE // (len(data.split(b"|")[0]) + 1) * (
                len(data.split(b"|")[0]) + 1
            )
            assert data.split(b"|")[0].decode() in versions
        for p in job.dir.rglob("*"):  # plaintext never reached the host's files
            if p.is_file():
                assert b"version-" not in p.read_bytes(), p
    assert killed >= 3, "the kill never landed inside the sealing window"
    # the next run completes and clears what interrupted runs left behind
    rerun = [sys.executable, "-m", "shieldml.cli", "run", "-m", str(job.manifest)]
    assert subprocess.run(rerun, capture_output=True, check=False).returncode == 0
    assert not list((job.dir / "out").glob(".*.partial"))
    with open_protected(out, job.result_key, bind=bind) as f:
        assert f.read(len(versions[-1])) == versions[-1].encode()
