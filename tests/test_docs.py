"""Documentation generated from the code stays current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    rc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_cli_docs.py"), "--check"], check=False
    ).returncode
    assert rc == 0, "docs/cli.md is stale: run `make docs`"
