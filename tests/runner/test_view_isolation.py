"""The view process holds every released key: nothing of the host's choosing reaches its imports.

Attack (issue 12, point 4): ``shieldml run`` started in a directory holding a ``base64.py`` (or
with ``PYTHONPATH`` naming one) made the view process import it, and the module copied every key.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shieldml.runner.run import run_job
from tests.runner.conftest import Job

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)

EVIL = """\
import importlib.util, pathlib, sys, sysconfig
pathlib.Path({mark!r}).write_text("the view imported the host's module")
spec = importlib.util.spec_from_file_location(
    "base64", pathlib.Path(sysconfig.get_paths()["stdlib"]) / "base64.py"
)
real = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real)
sys.modules["base64"] = real
"""


def _plant(d: Path, mark: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "base64.py").write_text(EVIL.format(mark=str(mark)))


def test_module_in_the_runners_working_directory_is_not_imported_by_the_view(
    job: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    mark = tmp_path / "stolen"
    _plant(tmp_path / "cwd", mark)
    monkeypatch.chdir(tmp_path / "cwd")
    job.authorize()
    assert run_job(job.manifest.resolve()) == 0
    assert not mark.exists()


def test_pythonpath_of_the_host_is_not_imported_by_the_view(
    job: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    mark = tmp_path / "stolen"
    _plant(tmp_path / "lib", mark)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "lib"))
    monkeypatch.setenv("PYTHONSTARTUP", str(tmp_path / "lib" / "base64.py"))
    job.authorize()
    assert run_job(job.manifest) == 0
    assert not mark.exists()
