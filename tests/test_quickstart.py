"""docs/quickstart.md works as written: every ```sh block, in order, in one ``bash -e``.

The blocks run from a stand-in for a fresh clone (a temporary directory whose ``.venv`` is the
virtual environment running this test, so the doc's ``. .venv/bin/activate`` is exercised),
with ``SHIELDML_HOME`` inside it (nothing touches ``~``) and this tree's ``src`` first on
``PYTHONPATH`` (the code under test, even where the venv holds another editable install). One
substitution: the broker's port 8443 becomes a free one, so parallel runs do not collide. The
broker the doc starts in the background is stopped by the doc; should a block fail first, an
EXIT trap and then the test (the process group it started) stop it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "quickstart.md"
FENCE = re.compile(r"^```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def sh_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def run_doc_verbatim(
    doc: Path, tmp_path: Path, *, extra_path: tuple[Path, ...] = (), timeout: float = 120
) -> tuple[Path, int, str]:
    """Run ``doc``'s sh blocks in order in one ``bash -e`` from a stand-in for a fresh clone
    (see the module docstring); return the clone, the exit status and the output."""
    venv = Path(sys.prefix)
    assert (venv / "bin" / "activate").exists(), "run the suite from the project's virtualenv"
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / ".venv").symlink_to(venv)
    port = free_port()
    blocks = sh_blocks(doc.read_text(encoding="utf-8"))
    script = "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + "\n".join(
        b.replace("8443", str(port)) for b in blocks
    )
    path = ":".join(str(p) for p in (venv / "bin", *extra_path))
    env = {
        "PATH": f"{path}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "SHIELDML_HOME": str(tmp_path / "shieldml-home"),
        "PYTHONPATH": str(ROOT / "src"),
        "LANG": "C.UTF-8",
    }
    proc = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group this test started
            os.killpg(proc.pid, signal.SIGKILL)  # (a broker left over after a failure)
        proc.wait()
    return clone, proc.returncode, output


def test_sh_blocks_are_found_in_order():
    blocks = sh_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 5
    assert blocks[0].startswith(". .venv/bin/activate")
    assert "shieldml broker serve" in blocks[1]
    assert blocks[-1].rstrip().endswith("# stop the broker")


@pytest.mark.skipif(sys.platform != "linux", reason="shielded runs need Linux namespaces")
def test_quickstart_runs_verbatim(tmp_path: Path):
    pytest.importorskip("torch")
    clone, returncode, output = run_doc_verbatim(DOC, tmp_path)
    work = clone / "quickstart"
    log = (work / "broker.log").read_text() if (work / "broker.log").exists() else ""
    assert returncode == 0, f"{output}\n--- broker.log ---\n{log}"
    # what the steps promise, checked on what they left behind
    assert not (work / "model.pt").exists() and (work / "enc" / "model.pt.enc").exists()
    predictions = (work / "results" / "predictions.txt").read_text().splitlines()
    assert predictions == [
        "+1.0 +1.0 -> class 1",
        "-1.0 -1.0 -> class 0",
        "+2.0 +0.5 -> class 1",
        "-0.5 -2.0 -> class 0",
    ]
    assert "accepted by profile 1 of policy.toml" in output
    assert "chain intact" in output
    assert not (tmp_path / "home").exists()  # nothing was written to ~
