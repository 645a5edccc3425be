"""Train DigitsNet on data/train.pt and write model/model.pt. An ordinary PyTorch script."""

import torch
from digits_net import DigitsNet
from torch import nn

torch.manual_seed(0)
torch.set_num_threads(2)
data = torch.load("data/train.pt", weights_only=True)
x, y = data["images"], data["labels"]
model = DigitsNet()
optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
loss_fn = nn.CrossEntropyLoss()
for _epoch in range(25):
    order = torch.randperm(len(x))
    for i in range(0, len(x), 64):
        batch = order[i : i + 64]
        optimiser.zero_grad()
        loss = loss_fn(model(x[batch]), y[batch])
        loss.backward()
        optimiser.step()
torch.save(model.state_dict(), "model/model.pt")
print(f"trained on {len(x)} images, last loss {loss.item():.4f}")
