"""Attacks on the start-up changes of 084170a: the view's preload thread, the runner's SIGTERM
abort while it runs, gc.freeze() before exit, and shieldml.attest's lazy names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shieldml.runner.run import view_command
from shieldml.runner.view import EXIT_VIEW_FAILED

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _can_unshare() -> bool:
    probe = "import ctypes, sys; sys.exit(ctypes.CDLL(None).unshare(0x00020000 | (0 if __import__('os').geteuid() == 0 else 0x10000000)))"
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


needs_namespaces = pytest.mark.skipif(
    sys.platform != "linux" or not _can_unshare(), reason="needs mount namespaces"
)


def test_modules_planted_in_the_views_working_directory_or_environment_are_not_preloaded(
    tmp_path: Path,
):
    """The host picks the view's cwd and environment and can write files anywhere it likes:
    the preload thread imports while the main thread moves the working directory into the
    staging tmpfs. A ``cryptography`` (loaded first by the preload, through the recipient code)
    planted in the working directory or on PYTHONPATH is never what gets imported."""
    trap = tmp_path / "trap"
    (trap / "cryptography").mkdir(parents=True)
    marker = tmp_path / "imported"
    (trap / "cryptography" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise SystemExit('planted module ran')\n"
    )
    cmd = view_command()
    boot = cmd[3].replace(
        "sys.exit(v.main())",
        "assert 'cryptography' not in sys.modules; import os; os.chdir(sys.argv[1]); "
        "t = __import__('threading').Thread(target=v._preload); t.start(); t.join(); "
        "print(sorted(m for m in ('shieldml.files', 'shieldml.runner.manifest', "
        "'shieldml.runner.recipient') if m in sys.modules)); "
        "print(sys.modules['cryptography'].__file__)",
    )
    out = subprocess.run(
        [cmd[0], "-I", "-c", boot, cmd[4], str(trap)],
        cwd=trap,
        env={"PYTHONPATH": str(trap), "PYTHONSTARTUP": str(trap / "x.py")},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert out[0] == "['shieldml.files', 'shieldml.runner.manifest', 'shieldml.runner.recipient']"
    assert not out[1].startswith(str(trap)) and not marker.exists()


_RETRY = textwrap.dedent(
    """
    import importlib.abc, sys, threading
    import shieldml.runner.view as v

    class FailOnPreload(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "shieldml.runner.recipient" and threading.current_thread().name != "MainThread":
                raise ImportError("transient failure on the preload thread")
            return None

    sys.meta_path.insert(0, FailOnPreload())
    t = threading.Thread(target=v._preload, name="shieldml-view-preload")
    t.start(); t.join()
    print("shieldml.runner.recipient" in sys.modules, "shieldml.files" in sys.modules)
    from shieldml.runner.recipient import seal_key
    print(seal_key.__module__)
    """
)


def test_an_import_that_fails_on_the_preload_thread_is_imported_again_where_it_is_used():
    """A failure on the preload thread is swallowed there and does not stick: the module is
    not left half-made in sys.modules, and the main thread's import after the keys loads it
    (or raises its own error)."""
    out = subprocess.run(
        [sys.executable, "-c", _RETRY], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    assert out == ["False True", "shieldml.runner.recipient"]


_STAGE_SIGTERM = textwrap.dedent(
    """
    import io, json, os, signal, sys, types
    import shieldml.runner.view as v

    real = v.tmpfs

    def tmpfs(target, mode="0700"):
        real(target, mode)
        if target == "s":  # the runner's abort lands while the staging tmpfs is being made
            os.kill(os.getpid(), signal.SIGTERM)

    v.tmpfs = tmpfs
    r, w = os.pipe()
    plan = {"result_fd": w, "inputs": [], "outputs": []}
    sys.stdin = types.SimpleNamespace(buffer=io.BytesIO(json.dumps(plan).encode() + b"\\n"))
    rc = v.main()
    os.close(w)
    print(rc, os.read(r, 65536).decode() or "{}")
    """
)


@needs_namespaces
def test_the_runners_abort_while_the_view_makes_its_staging_tmpfs_leaves_no_directory(
    tmp_path: Path,
):
    """SIGTERM (the runner's abort: KeysWithheldError in the view's main thread) can land at any
    bytecode once the plan was read; while the preload thread holds the GIL for its imports the
    main thread spends longer inside private_stage(). Landing there must still leave nothing on
    the host's /tmp."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {SRC!r})\n" + _STAGE_SIGTERM],
        env={"TMPDIR": str(tmp)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split(" ", 1)
    assert out[0] == str(EXIT_VIEW_FAILED)
    assert os.listdir(tmp) == []


def _main_thread_reads_stdin(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] == "0" and int(fields[1], 16) == 0  # read(0, ...)


@needs_namespaces
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="reads the x86-64 syscall number")
def test_the_runners_abort_while_the_view_waits_for_keys_leaves_no_stage_and_no_copy(
    tmp_path: Path,
):
    """The whole view process: it reads the plan, starts the preload thread, lays out its root,
    copies the (32 MiB) ciphertext and waits for the keys; SIGTERM then ends it with
    KeysWithheldError reported, exit 70, and no staging directory on the host."""
    tmp, job = tmp_path / "tmp", tmp_path / "job"
    tmp.mkdir()
    job.mkdir()
    (job / "model.enc").write_bytes(os.urandom(32 << 20))
    r, w = os.pipe()
    cmd = view_command()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, pass_fds=(w,), cwd="/", env={"TMPDIR": str(tmp)}
    )
    os.close(w)
    try:
        plan = {
            "result_fd": w,
            "argv": ["/bin/true"],
            "cwd": str(job),
            "base": str(job),
            "trusted": [],
            "env": {},
            "inputs": [
                {"path": f"{job}/model.bin", "ciphertext": str(job / "model.enc"),
                 "broker": "b", "key": "k", "format": "stream", "sha256": None,
                 "bind": f"{job}/model.bin"}
            ],
            "outputs": [],
        }  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(plan).encode() + b"\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while not (os.listdir(tmp) and _main_thread_reads_stdin(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == EXIT_VIEW_FAILED
        with os.fdopen(r, "rb") as f:
            doc = json.loads(f.read())
        r = -1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        if r >= 0:
            os.close(r)
    assert doc["kind"] == "KeysWithheldError"
    assert os.listdir(tmp) == []


def test_the_cli_entry_still_writes_its_json_line_and_exit_code_after_freezing_the_collector():
    """gc.freeze() before exit: the --json line (written by click.echo) and the exit code are
    what main() decided; nothing waits on the last collection."""
    probe = (
        "import sys; sys.argv = ['shieldml', 'inspect', '/nonexistent', '--json']\n"
        "from shieldml.cli import entry; entry()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    doc = json.loads(done.stderr.strip().splitlines()[-1])
    assert doc["ok"] is False and doc["exit_code"] == 2


def test_every_module_importing_shieldml_attest_names_resolves_them():
    """Every ``from shieldml.attest import X`` in src/ (at module level or in a function)
    resolves through the lazy names or a submodule, in a fresh interpreter."""
    import ast

    names: set[str] = set()
    for path in Path(SRC, "shieldml").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "shieldml.attest":
                names |= {a.name for a in node.names}
    probe = "".join(f"from shieldml.attest import {n}\n" for n in sorted(names))
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)
    assert {"Check", "TeeKind", "_der", "canonical_tee"} <= names
