"""docs/from-gramine-ppml.md works as written: its walkthrough's ```sh blocks, in order, in one
``bash -e``, with Gramine's own pf-crypt as ``gramine-sgx-pf-crypt`` (``SHIELDML_GRAMINE_PF``).

As tests/test_quickstart.py does for the quickstart: a stand-in for a fresh clone whose
``.venv`` is this test's virtual environment, ``SHIELDML_HOME`` inside it, this tree's ``src``
first on ``PYTHONPATH``, the broker's port 8443 replaced by a free one. The doc compares the
owner's decrypted result with the native run itself (``cmp``); the test checks it again, and
what the files and the receipt say.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import pf_crypt_tool
from tests.test_quickstart import run_doc_verbatim, sh_blocks

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "from-gramine-ppml.md"


def test_walkthrough_blocks_are_found_in_order():
    blocks = sh_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) == 5
    assert blocks[0].startswith(". .venv/bin/activate")
    assert "gramine-sgx-pf-crypt encrypt" in blocks[0]
    assert "shieldml run -m job.toml" in blocks[3]  # the SGX block is not sh: not run
    assert blocks[-1].rstrip().endswith("# stop the broker")


@pytest.mark.skipif(sys.platform != "linux", reason="shielded runs need Linux namespaces")
@pytest.mark.skipif(os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces)")
def test_walkthrough_runs_verbatim_on_pf_crypt_files(tmp_path: Path):
    pytest.importorskip("torch")
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "gramine-sgx-pf-crypt").symlink_to(pf_crypt_tool("v1.9"))
    clone, returncode, output = run_doc_verbatim(DOC, tmp_path, extra_path=(tools,), timeout=180)
    work = clone / "ppml"
    log = (work / "broker.log").read_text() if (work / "broker.log").exists() else ""
    assert returncode == 0, f"{output}\n--- broker.log ---\n{log}"
    assert "same bytes as the native run" in output
    native = (work / "native" / "result.txt").read_bytes()
    assert (work / "result.txt").read_bytes() == native and native.count(b"\n") == 5
    # the inputs are pf-crypt's files as it wrote them (relative stored paths), never rewritten
    manifest = (work / "job.toml").read_text()
    for name in ("model.pt", "input.pt", "classes.txt"):
        assert f'bind = "{name}"' in manifest
    receipt = json.loads((work / "receipt.json").read_text())["receipt"]
    assert [i["bind"] for i in receipt["inputs"]] == ["model.pt", "input.pt", "classes.txt"]
    assert receipt["exit_code"] == 0
    assert "decrypt" in output and "program" in output  # the run's phase times are printed
    app = sorted(p.name for p in (work / "app").iterdir())
    assert app == ["classes.txt", "infer.py", "input.pt", "model.pt", "result.txt"]
    assert not (tmp_path / "home").exists()
