"""docs/gpu-quickstart.md works as written (every ```sh block, in order, in one ``bash -e``; see
tests/test_quickstart.py): two simulated GPUs get the key and are named in the receipt, and the
host's switch of the GPUs out of confidential-computing mode is refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.test_quickstart import ROOT, run_doc_verbatim, sh_blocks

DOC = ROOT / "docs" / "gpu-quickstart.md"


def test_blocks_end_by_stopping_the_broker():
    blocks = sh_blocks(DOC.read_text(encoding="utf-8"))
    assert blocks[0].startswith(". .venv/bin/activate")
    assert blocks[-1].rstrip().endswith("# stop the broker")


@pytest.mark.skipif(sys.platform != "linux", reason="shielded runs need Linux namespaces")
def test_gpu_quickstart_runs_verbatim(tmp_path: Path):
    pytest.importorskip("torch")
    clone, returncode, output = run_doc_verbatim(DOC, tmp_path)
    work = clone / "gpu-quickstart"
    log = (work / "broker.log").read_text() if (work / "broker.log").exists() else ""
    assert returncode == 0, f"{output}\n--- broker.log ---\n{log}"
    assert "gpu = { count = 2," in output
    assert "GPU 1 (verified by broker" in output and "accepted by profile 1" in output
    receipt = json.loads((work / "receipt.json").read_text())["receipt"]
    (listed,) = receipt["gpus"].values()
    assert [(g["cc_mode"], g["root"]) for g in listed] == [("on", "simulated")] * 2
    assert (work / "results" / "predictions.txt").read_text().count("-> class") == 4
    assert output.rstrip().endswith("GPU 0 not in confidential-computing mode")
