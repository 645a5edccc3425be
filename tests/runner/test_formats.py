"""Native C++ (TorchScript) and Rust (safetensors, mmap) readers work on the decrypted view."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from shieldml.files import encrypt_path, open_protected
from shieldml.runner.run import run_job
from tests.runner.conftest import Job, write_manifest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)
SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "formats" / "load_formats.py"


class Net(torch.nn.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


def test_torchscript_and_safetensors(job: Job, tmp_path: Path):
    native = tmp_path / "native"
    for d in ("model", "data", "out"):
        (native / d).mkdir(parents=True)
    torch.manual_seed(3)
    net = Net()
    with (
        warnings.catch_warnings()
    ):  # TorchScript is deprecated in torch 2.13, its archives still exist
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(net).save(str(native / "model" / "model.ts"))
    safetensors_torch.save_file(
        {"w1": net.l1.weight, "b1": net.l1.bias, "w2": net.l2.weight, "b2": net.l2.bias},
        str(native / "model" / "model.safetensors"),
    )
    torch.save(torch.randn(5, 16), native / "data" / "input.pt")
    shutil.copy(SCRIPT, native / "load_formats.py")
    subprocess.run([sys.executable, "load_formats.py"], cwd=native, check=True)
    expected = (native / "out" / "result.txt").read_bytes()
    assert expected.startswith(b"max difference 0.000e+00") or b"e-0" in expected.split(b"\n")[0]

    d = job.dir
    shutil.copy(SCRIPT, d / "work" / "load_formats.py")
    work = (d / "work").resolve()
    encrypt_path(native / "model", d / "enc" / "model", job.model_key, bind=str(work / "model"))
    encrypt_path(
        native / "data" / "input.pt",
        d / "enc" / "input.pt.enc",
        job.model_key,
        bind=str(work / "data" / "input.pt"),
    )
    job.manifest = write_manifest(
        d, job.broker, job.sim_dir, argv=[sys.executable, "load_formats.py"], trusted=["work/load_formats.py"],
        inputs=[("model/", "enc/model", "model"), ("data/input.pt", "enc/input.pt.enc", "model")],
        outputs=[("out/", "enc/out", "results")],
    )  # fmt: skip
    job.authorize()
    assert run_job(job.manifest) == 0
    with open_protected(
        d / "enc" / "out" / "result.txt", job.result_key, bind=str(work / "out" / "result.txt")
    ) as f:
        assert f.read() == expected
