"""The host cannot swap the decrypted view's mount points under a running program unnoticed.

Attack (issue 12, point 2): the view's mounts sit on placeholder entries in the job directory.
Unlinking or replacing such an entry from the host's mount namespace detaches the mount in the
view's namespace too: the program then writes its "sealed" output as plaintext to host disk,
and on main the run exited 0 and sealed an empty output.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from shieldml.errors import ShieldError
from shieldml.runner.run import run_job
from tests.runner.conftest import Job, write_manifest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)

APP = """\
import pathlib, sys, time
model = open("model.bin", "rb").read()
pathlib.Path(sys.argv[1]).write_text("running")
deadline = time.monotonic() + 30
while not pathlib.Path(sys.argv[2]).exists() and time.monotonic() < deadline:
    time.sleep(0.05)
open("result.txt", "w").write("RESULT-PLAINTEXT")
"""


def test_host_replacing_a_mount_point_while_the_program_runs_seals_nothing(
    job: Job, tmp_path: Path
):
    ready, go = tmp_path / "ready", tmp_path / "go"
    (job.dir / "work" / "app.py").write_text(APP)
    write_manifest(
        job.dir, job.broker, job.sim_dir, argv=[sys.executable, "app.py", str(ready), str(go)],
        trusted=["work/app.py"], inputs=[("model.bin", "enc/model.bin.enc", "model")],
        outputs=[("result.txt", "out/result.txt.enc", "results")],
    )  # fmt: skip
    job.authorize()
    outcome: list[BaseException | int] = []

    def run() -> None:
        try:
            outcome.append(run_job(job.manifest))
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.05)
    assert ready.exists(), outcome
    placeholder = job.dir / "work" / "result.txt"
    placeholder.unlink()  # from the host's namespace: detaches the view's bind mount
    placeholder.write_bytes(b"")
    go.write_text("go")
    t.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], ShieldError), outcome
    msg = str(outcome[0])
    assert "result.txt: the protected mount was removed or replaced" in msg
    assert "nothing was sealed" in msg
    assert not (job.dir / "out" / "result.txt.enc").exists()
