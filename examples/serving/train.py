"""The model owner's side: train the digits MLP on scikit-learn's bundled digits (no download)
and write model/model.pt (a plain state dict), plus a few test images for the client.

    python train.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from digits_mlp import DigitsMLP
from sklearn.datasets import load_digits

out = Path(sys.argv[1])
(out / "model").mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32)
y = torch.tensor(digits.target)
model = DigitsMLP()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(200):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x[:1500]), y[:1500])
    loss.backward()
    opt.step()
with torch.no_grad():
    acc = (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
torch.save(model.state_dict(), out / "model" / "model.pt")
samples = [
    {"pixels": digits.data[i].tolist(), "label": int(digits.target[i])} for i in range(1500, 1510)
]
(out / "samples.json").write_text(json.dumps(samples))
print(f"held-out accuracy {acc:.3f}; wrote {out / 'model' / 'model.pt'}")
