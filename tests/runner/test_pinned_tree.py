"""A pinned directory input is read once: the bytes hashed against the pin are the bytes decrypted.

Attack (issue 12, point 5): on main a pinned directory was hashed by path, then each file was
reopened by path to decrypt it, so an older (still validly encrypted) file swapped in between
was decrypted under the new version's pin: a rollback.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from shieldml.errors import ShieldError
from shieldml.files import encrypt_file, open_protected
from shieldml.runner.manifest import ciphertext_digest
from shieldml.runner.run import run_job
from tests.runner.conftest import Job, write_manifest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)

APP = """\
import pathlib
pathlib.Path("result.txt").write_text(pathlib.Path("data/a.txt").read_text())
"""


def _enc(job: Job, text: bytes, out: Path, bind: str) -> None:
    plain = job.dir / "p"
    plain.write_bytes(text)
    encrypt_file(plain, out, job.model_key, bind=bind, overwrite=True)


def test_pinned_directory_file_swapped_between_hash_and_decrypt_is_never_used(job: Job):
    work = (job.dir / "work").resolve()
    (work / "app.py").write_text(APP)
    tree = job.dir / "enc" / "data"
    tree.mkdir()
    old, new = job.dir / "a.old", job.dir / "a.new"
    _enc(job, b"VERSION-1", old, str(work / "data" / "a.txt"))
    _enc(job, b"VERSION-2", new, str(work / "data" / "a.txt"))
    for i in range(24):  # hashing these after a.txt opens the window on main
        _enc(job, os.urandom(1 << 20), tree / f"b{i:02}.bin", str(work / "data" / f"b{i:02}.bin"))
    (tree / "a.txt").write_bytes(new.read_bytes())
    pin = ciphertext_digest(tree)
    m = write_manifest(
        job.dir, job.broker, job.sim_dir, argv=[sys.executable, "app.py"], trusted=["work/app.py"],
        inputs=[("data/", "enc/data", "model")], outputs=[("result.txt", "out/result.txt.enc", "results")],
    )  # fmt: skip
    m.write_text(
        m.read_text().replace(
            'ciphertext = "enc/data"', f'ciphertext = "enc/data"\nsha256 = "{pin}"'
        )
    )
    job.authorize()
    stop = threading.Event()

    def swap() -> None:  # the host flips a.txt between the pinned and the older version
        tmp = tree / ".swap"
        versions = (old.read_bytes(), new.read_bytes())
        i = 0
        while not stop.is_set():
            tmp.write_bytes(versions[i % 2])
            os.replace(tmp, tree / "a.txt")
            i += 1
            stop.wait(0.003)

    t = threading.Thread(target=swap)
    t.start()
    seen = []
    try:
        for _ in range(6):
            try:
                assert run_job(m) == 0
            except ShieldError as e:
                assert "not the ciphertext the job pins" in str(e)
                seen.append("refused")
                continue
            with open_protected(
                job.dir / "out" / "result.txt.enc", job.result_key, bind=str(work / "result.txt")
            ) as f:
                seen.append(f.read().decode())
    finally:
        stop.set()
        t.join()
    assert "VERSION-1" not in seen, seen


def test_symbolic_link_in_a_pinned_directory_is_refused(job: Job, tmp_path: Path):
    from shieldml.errors import ViewError
    from shieldml.runner.view import open_tree

    (tmp_path / "t" / "sub").mkdir(parents=True)
    (tmp_path / "t" / "sub" / "f").write_bytes(b"x")
    (tmp_path / "t" / "link").symlink_to(tmp_path / "t" / "sub" / "f")
    with (
        pytest.raises(ViewError, match="symbolic links are refused"),
        open_tree(str(tmp_path / "t")),
    ):
        pass
    (tmp_path / "t" / "link").unlink()
    with open_tree(str(tmp_path / "t")) as fds:
        assert list(fds) == ["sub/f"]
