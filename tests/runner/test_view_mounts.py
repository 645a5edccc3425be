"""The host cannot swap the decrypted view's files under a running program.

Attack (issue 12, point 2): on main the view's mounts sat on placeholder entries in the job
directory. Unlinking or replacing such an entry from the host's mount namespace detached the mount
in the view's namespace too: the program wrote its "sealed" output as plaintext to host disk, and
the run exited 0 and sealed an empty output. Now the program runs in a private root: the host's
job directory holds no mount point and nothing the program reads or writes there.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from shieldml.files import open_protected
from shieldml.runner.run import run_job
from tests.runner.conftest import Job, write_manifest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)

APP = """\
import pathlib, sys, time
sig = pathlib.Path(sys.argv[1])
deadline = time.monotonic() + 30
while not (sig / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
model = open("model.bin", "rb").read()
open("result.txt", "w").write(f"RESULT-PLAINTEXT {len(model)}")
"""


def _running(marker: str) -> bool:
    """The program is running: a process whose command line names ``marker`` (the host sees it)."""
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and marker.encode() in (p / "cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def test_host_replacing_entries_at_protected_paths_while_the_program_runs_changes_nothing(
    job: Job, tmp_path: Path
):
    sig = tmp_path / "sig"  # a host directory the program sees (bound read-only into its root)
    sig.mkdir()
    (job.dir / "work" / "app.py").write_text(APP)
    write_manifest(
        job.dir, job.broker, job.sim_dir, argv=[sys.executable, "app.py", str(sig)],
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
    while not _running(str(sig)) and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.05)
    assert _running(str(sig)), outcome
    work = job.dir / "work"
    for name, planted in (("result.txt", b""), ("model.bin", b"HOST-MODEL")):
        p = work / name
        if p.exists():  # on main: the placeholder the view's mount sits on
            p.unlink()
        p.write_bytes(planted)
    (sig / "go").write_text("go")
    t.join(60)
    assert outcome == [0], outcome
    # the program read the owner's model, and its result reached only the sealed output
    bind = str(work.resolve() / "result.txt")
    with open_protected(job.dir / "out" / "result.txt.enc", job.result_key, bind=bind) as f:
        assert f.read() == b"RESULT-PLAINTEXT 16401"
    assert (work / "result.txt").read_bytes() == b""
    assert (work / "model.bin").read_bytes() == b"HOST-MODEL"
