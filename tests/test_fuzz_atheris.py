"""A short run of the coverage-guided fuzzers (scripts/fuzz_atheris.py; `make fuzz` runs them long).

Keeps the harness itself working: every target must start, execute inputs and find nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytest.importorskip("atheris", reason="atheris has no wheel for this platform")


@pytest.mark.parametrize(
    "targets",
    [
        "quote,quote-verify,snp,snp-verify,ratls",
        "gramine-pf,stream,policy,manifest",
        "collateral,http",
    ],
)
def test_targets_run_and_find_nothing(tmp_path: Path, targets: str):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fuzz_atheris.py"), "--seconds", "1",
         "--only", targets, "--json", "--keep", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    rows = json.loads(proc.stdout)
    assert [r["target"] for r in rows] == targets.split(",")
    for r in rows:
        assert r["executions"] > 0 and r["coverage"] > 0, (r, proc.stderr[-2000:])
        assert not r["findings"] and r["exit"] == 0, (
            r,
            (tmp_path / f"{r['target']}.log").read_text()[-3000:],
        )
    assert proc.returncode == 0
