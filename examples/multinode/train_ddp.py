"""Data-parallel training with torch.distributed (gloo): each node trains on its own shard.

Launched by torchrun on every node; reads data/shard.pt (this node's encrypted shard, decrypted
by its own runner) and, on rank 0, writes model/model.pt. An ordinary script: it runs natively too.
"""

import os

import torch
import torch.distributed as dist
from torch import nn

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # same initial weights everywhere
model = nn.parallel.DistributedDataParallel(
    nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
)
optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
shard = torch.load("data/shard.pt", weights_only=True)
for _ in range(50):
    optimiser.zero_grad()
    loss = nn.functional.mse_loss(model(shard["x"]), shard["y"])
    loss.backward()  # gradients are averaged across the nodes
    optimiser.step()
if rank == 0:
    os.makedirs("model", exist_ok=True)
    torch.save(model.module.state_dict(), "model/model.pt")
    print(f"trained on {world} nodes, final loss on node 0: {loss.item():.4f}")
dist.destroy_process_group()
