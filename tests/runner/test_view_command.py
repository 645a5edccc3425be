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
