"""Shell completion as docs/cli.md documents it: the script generates, and completes in bash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
#: the console script, as pip writes it: the program's name is what argv[0] says
SHIELDML = f"import sys; sys.argv[0] = 'shieldml'; sys.path.insert(0, {SRC!r}); " + (
    "from shieldml.cli import entry; entry()"
)


def _shieldml(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SHIELDML], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60, check=False)  # fmt: skip


@pytest.mark.parametrize(
    ("shell", "marker"),
    [("bash", "complete -o nosort -F _shieldml_completion shieldml"), ("zsh", "#compdef shieldml"),
     ("fish", "complete --no-files --command shieldml")],
)  # fmt: skip
def test_completion_script_generates(shell: str, marker: str):
    r = _shieldml({"_SHIELDML_COMPLETE": f"{shell}_source"})
    assert r.returncode == 0, r.stderr
    assert marker in r.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completes_commands_and_choices(tmp_path: Path):
    script = tmp_path / "complete.bash"
    script.write_text(_shieldml({"_SHIELDML_COMPLETE": "bash_source"}).stdout)
    # `shieldml` on PATH, as pip installs it (the completion script runs it by name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "shieldml").write_text(f'#!/bin/sh\nexec {sys.executable} -c "$SHIELDML_PY" "$@"\n')
    (bin_dir / "shieldml").chmod(0o755)
    probe = f"""
source {script}
COMP_WORDS=(shieldml enc); COMP_CWORD=1; _shieldml_completion shieldml; echo "1:${{COMPREPLY[*]}}"
COMPREPLY=(); COMP_WORDS=(shieldml job init a.py --tee ''); COMP_CWORD=5; _shieldml_completion shieldml
echo "2:${{COMPREPLY[*]}}"
"""
    r = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SHIELDML_PY": SHIELDML,
                            "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}, check=False)  # fmt: skip
    lines = dict(line.split(":", 1) for line in r.stdout.splitlines() if ":" in line)
    assert lines.get("1", "").split() == ["encrypt"], r
    assert set(lines.get("2", "").split()) == {"auto", "simulated", "sgx", "tdx", "snp"}, r
