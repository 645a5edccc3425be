"""The view (which holds every key) runs the runner's own shieldml, isolated from the host's
environment, not whichever shieldml an isolated interpreter would find first."""

from __future__ import annotations

import subprocess

import shieldml
from shieldml.runner.run import VIEW_BOOT, view_command


def test_view_imports_the_runners_own_shieldml_in_isolation():
    cmd = view_command()
    assert cmd[1] == "-I" and cmd[3] == VIEW_BOOT
    probe = VIEW_BOOT.replace(
        "import shieldml.runner.view as v; sys.exit(v.main())",
        "import shieldml; print(shieldml.__file__)",
    )
    assert probe != VIEW_BOOT
    out = subprocess.run(
        [*cmd[:3], probe, *cmd[4:]],
        env={"PYTHONPATH": "/nonexistent"},
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout.splitlines()
    assert out[0] == shieldml.__file__
    # -I: the host's PYTHONPATH is not on sys.path
    probe_path = VIEW_BOOT.replace(
        "import shieldml.runner.view as v; sys.exit(v.main())", "print('/nonexistent' in sys.path)"
    )
    flag = subprocess.run(
        [*cmd[:3], probe_path, *cmd[4:]],
        env={"PYTHONPATH": "/nonexistent"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert flag == "False"


def test_the_view_is_single_threaded_when_it_enters_its_namespace(monkeypatch):
    """Without root the view enters a user namespace, which the kernel refuses to a process
    with more than one thread (EINVAL): what the view loads on another thread starts after."""
    import gc
    import io
    import json
    import os
    import threading
    import types

    import shieldml.runner.view as view
    from shieldml.errors import ShieldError

    seen: list[int] = []

    def enter() -> None:
        seen.append(threading.active_count())
        raise ShieldError("stopped here")

    r, w = os.pipe()
    plan = json.dumps({"result_fd": w, "inputs": [], "outputs": []}).encode() + b"\n"
    monkeypatch.setattr(view.sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(plan)))
    monkeypatch.setattr(view, "die_with_parent", lambda: None)
    monkeypatch.setattr(view, "enter_private_namespace", enter)
    monkeypatch.setattr(view.signal, "signal", lambda *_a: None)  # the test process keeps its own
    before = threading.active_count()
    try:
        assert view.main() == view.EXIT_VIEW_FAILED
    finally:
        gc.unfreeze()  # main() leaves the collector frozen for the interpreter's exit
        os.close(w)
    with os.fdopen(r, "rb") as f:
        assert b"stopped here" in f.read()
    assert seen == [before]
