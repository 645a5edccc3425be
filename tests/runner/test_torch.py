"""Acceptance: an unmodified PyTorch script gives byte-identical results natively and shielded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shieldml.files import encrypt_file, open_protected
from shieldml.runner.run import run_job
from tests.runner.conftest import Job, write_manifest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)

INFER = """\
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

    def forward(self, x):
        return self.body(x)

torch.manual_seed(0)
state = torch.load("model.pt", weights_only=True)
net = Net()
net.load_state_dict({k: v for k, v in state.items() if not k.startswith("MARKER")})
x = torch.load("input.pt", weights_only=True)
with torch.no_grad():
    logits = net(x)
with open("result.txt", "w") as f:
    for row in logits:
        f.write(" ".join(f"{v:.6f}" for v in row.tolist()) + "\\n")
"""


def make_model(d: Path) -> None:
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    state = {f"body.{k}": v for k, v in net.state_dict().items()}
    state["MARKER_MODEL_PLAINTEXT_8c1f"] = torch.zeros(1)
    torch.save(state, d / "model.pt")
    torch.save(torch.randn(8, 64) + 0.125, d / "input.pt")


def test_pytorch_inference_byte_identical(job: Job, tmp_path: Path):
    native = tmp_path / "native"
    native.mkdir()
    (native / "infer.py").write_text(INFER)
    make_model(native)
    subprocess.run([sys.executable, "infer.py"], cwd=native, check=True)
    expected = (native / "result.txt").read_bytes()

    d = job.dir
    (d / "work" / "infer.py").write_text(INFER)
    work = (d / "work").resolve()
    for name in ("model.pt", "input.pt"):
        encrypt_file(native / name, d / "enc" / f"{name}.enc", job.model_key, bind=str(work / name))
    job.manifest = write_manifest(
        d, job.broker, job.sim_dir, argv=[sys.executable, "infer.py"], trusted=["work/infer.py"],
        inputs=[("model.pt", "enc/model.pt.enc", "model"), ("input.pt", "enc/input.pt.enc", "model")],
        outputs=[("result.txt", "out/result.txt.enc", "results")],
    )  # fmt: skip
    job.authorize()
    assert run_job(job.manifest) == 0
    with open_protected(
        d / "out" / "result.txt.enc", job.result_key, bind=str(work / "result.txt")
    ) as f:
        assert f.read() == expected
    for p in d.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert b"MARKER_MODEL_PLAINTEXT" not in data and expected[:20] not in data, p
