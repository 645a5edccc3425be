"""A job of the runner's ``job`` fixture as a simulated confidential VM with GPUs, and what its
broker answers: shared by tests/runner/test_gpu_run.py and test_gpu_run_attacks.py."""

from __future__ import annotations

from typing import Any

import pytest

from shieldml.errors import BrokerError, ReleaseDenied
from shieldml.runner.manifest import JobManifest
from shieldml.runner.run import run_job
from tests.runner.conftest import Job


def gpu_job(job: Job, *, gpu: str = "", sim: str = "", kind: str = "tdx") -> JobManifest:
    """The fixture's job as a simulated ``kind`` VM with ``[gpu]`` (``gpu``: more of that
    table; ``sim``: more of ``[simulated]``)."""
    plain = job.__dict__.setdefault("plain_manifest", job.manifest.read_text())
    text = plain.replace('kind = "sgx"', f'kind = "{kind}"')
    text = text.replace('mrenclave = "' + "7e" * 32 + '"\n', "")
    job.manifest.write_text(text + sim + '\n[gpu]\nevidence = "nvml"\n' + gpu)
    return JobManifest.load(job.manifest)


def authorize(job: Job, policy: str) -> None:
    with job.admin() as c:
        for name in ("model", "results"):
            c.set_policy(name, policy)


def denial(job: Job, kind: type[BrokerError] = ReleaseDenied) -> Any:
    """The broker's 403 (``ReleaseDenied``: the policy said no; ``BrokerError``: the evidence
    itself was refused), with nothing run."""
    with pytest.raises(kind) as e:
        run_job(job.manifest)
    assert e.value.status == 403
    assert not (job.dir / "out" / "result.txt.enc").exists()
    return e.value.detail


def failed_checks(detail: Any) -> dict[str, str]:
    verdict = detail["verdicts"]["model"]
    return {c["name"]: c["actual"] for c in verdict["profiles"][0]["checks"] if not c["passed"]}
