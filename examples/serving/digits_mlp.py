"""The digits classifier: an MLP over the 64 pixels (0..16) of scikit-learn's 8x8 digits."""

import torch
from torch import nn


class DigitsMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 16.0)
