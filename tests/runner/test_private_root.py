"""What was measured is exactly what runs, and nothing unmeasured from the job directory runs.

Attacks (issue 12, points 3 and 4): on main the trusted files were hashed, then executed from the
host's paths, so the host could swap ``app.py`` between the two; a planted ``__pycache__`` file
whose header matched the trusted source ran instead of it; a ``json.py`` next to the trusted
script was imported. The program now runs in a private root holding the bytes that were measured.
"""

from __future__ import annotations

import os
import py_compile
import sys
import time
from pathlib import Path

import pytest

from shieldml.files import open_protected
from shieldml.runner.run import run_job
from tests.runner.conftest import Job, write_manifest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)

HELPER = 'WHO = "measured helper"' + " " * 16 + "\n"
APP = """\
import json, pathlib
import helper
pathlib.Path("result.txt").write_text(json.dumps({"who": helper.WHO}))
"""
EVIL_APP = 'import pathlib; pathlib.Path("result.txt").write_text("EVIL")\n'


def _job(job: Job) -> Path:
    work = job.dir / "work"
    (work / "app.py").write_text(APP)
    (work / "helper.py").write_text(HELPER)
    m = write_manifest(
        job.dir, job.broker, job.sim_dir, argv=[sys.executable, "app.py"],
        trusted=["work/app.py", "work/helper.py"], inputs=[],
        outputs=[("result.txt", "out/result.txt.enc", "results")],
    )  # fmt: skip
    job.authorize()
    return m


def _result(job: Job) -> str:
    bind = str((job.dir / "work").resolve() / "result.txt")
    with open_protected(job.dir / "out" / "result.txt.enc", job.result_key, bind=bind) as f:
        return f.read().decode()


def test_script_swapped_between_measurement_and_exec_runs_the_measured_bytes(job: Job):
    m = _job(job)
    app = job.dir / "work" / "app.py"

    def after_measuring(line: str) -> None:  # the host strikes right after the hash
        if line.startswith("workload digest"):
            app.write_text(EVIL_APP)

    assert run_job(m, log=after_measuring) == 0
    assert _result(job) == '{"who": "measured helper"}'


def test_planted_bytecode_matching_the_trusted_source_is_not_run(job: Job, tmp_path: Path):
    m = _job(job)
    work = job.dir / "work"
    evil = tmp_path / "helper.py"
    evil.write_text('WHO = "planted bytecode"'.ljust(len(HELPER) - 1) + "\n")
    assert evil.stat().st_size == (work / "helper.py").stat().st_size
    pyc = work / "__pycache__" / f"helper.{sys.implementation.cache_tag}.pyc"
    py_compile.compile(str(evil), cfile=str(pyc), doraise=True)
    st = evil.stat()  # the pyc header records the evil source's mtime and size: match them
    os.utime(work / "helper.py", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_job(m) == 0
    assert _result(job) == '{"who": "measured helper"}'


def test_module_planted_next_to_the_trusted_script_is_not_imported(job: Job):
    m = _job(job)
    (job.dir / "work" / "json.py").write_text(
        'import pathlib\ndef dumps(_):\n    return "EVIL json.py"\n'
    )
    assert run_job(m) == 0
    assert _result(job) == '{"who": "measured helper"}'


def test_the_program_sees_only_measured_files_in_its_working_directory(job: Job, tmp_path: Path):
    work = job.dir / "work"
    (work / "untrusted.txt").write_text("host file")
    (work / "app.py").write_text(
        'import os, pathlib\npathlib.Path("result.txt").write_text(" ".join(sorted(os.listdir("."))))\n'
    )
    m = write_manifest(
        job.dir, job.broker, job.sim_dir, argv=[sys.executable, "app.py"], trusted=["work/app.py"],
        inputs=[("model.bin", "enc/model.bin.enc", "model")],
        outputs=[("result.txt", "out/result.txt.enc", "results")],
    )  # fmt: skip
    job.authorize()
    assert run_job(m) == 0
    assert _result(job) == "app.py model.bin result.txt"


def test_program_cannot_write_into_host_directories_beside_the_job(job: Job, tmp_path: Path):
    """Directories outside the job are the host's, shown read-only; /tmp, /var/tmp and /dev/shm
    are fresh tmpfs in the private root (on main a program's scratch plaintext reached the host)."""
    beside = tmp_path / "beside"
    beside.mkdir()
    probe = f"shieldml-leak-probe-{os.getpid()}-{time.monotonic_ns()}"
    (job.dir / "work" / "app.py").write_text(
        "import pathlib, sys\n"
        "out = []\n"
        "for d in (sys.argv[1], '/tmp', '/var/tmp', '/dev/shm'):\n"
        "    try:\n"
        "        (pathlib.Path(d) / sys.argv[2]).write_text('SCRATCH-PLAINTEXT')\n"
        "        out.append(d + ' writable')\n"
        "    except OSError as e:\n"
        "        out.append(d + ' ' + type(e).__name__)\n"
        "pathlib.Path('result.txt').write_text(';'.join(out[1:]) + '|' + out[0].split()[-1])\n"
    )
    m = write_manifest(
        job.dir, job.broker, job.sim_dir, argv=[sys.executable, "app.py", str(beside), probe],
        trusted=["work/app.py"], inputs=[], outputs=[("result.txt", "out/result.txt.enc", "results")],
    )  # fmt: skip
    job.authorize()
    assert run_job(m) == 0
    assert _result(job) == "/tmp writable;/var/tmp writable;/dev/shm writable|OSError"
    for d in (beside, Path("/tmp"), Path("/var/tmp"), Path("/dev/shm")):
        assert not (d / probe).exists(), d
