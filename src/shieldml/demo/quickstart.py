"""``shieldml demo --quickstart-files DIR``: the sample files docs/quickstart.md starts from.

``model.pt``: a small PyTorch classifier of 2-D points (the model owner's secret), trained here in
a fraction of a second on generated data (points above the line x + y = 0 are class 1);
``infer.py``: the job that classifies four points with it inside the TEE.
"""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

from shieldml.errors import OutputExistsError, ShieldError

FILES = ("model.pt", "infer.py")


def write_quickstart_files(directory: str | Path) -> list[Path]:
    """Write ``model.pt`` and ``infer.py`` into ``directory`` (made if missing; existing files
    are refused); return their paths."""
    d = Path(directory)
    paths = [d / name for name in FILES]
    for p in paths:
        if p.exists():
            raise OutputExistsError(f"{p}: already exists")
    if importlib.util.find_spec("torch") is None:
        raise ShieldError(
            "the quickstart's model is a PyTorch model: torch is missing",
            hint="pip install 'shieldml[examples]' (make setup installs it)",
        )
    d.mkdir(parents=True, exist_ok=True)
    _save_model(paths[0])
    script = resources.files("shieldml.demo").joinpath("quickstart-job/infer.py").read_text()
    paths[1].write_text(script, encoding="utf-8")
    return paths


def _save_model(path: Path) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    points = torch.randn(256, 2, generator=g)
    labels = (points.sum(dim=1) > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(points), labels)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    torch.save(model.state_dict(), path)
