"""Load the same model stored as a TorchScript archive and as safetensors, and compare them.

Both loaders are native code (TorchScript: C++; safetensors: Rust, memory-mapped), so this shows
that they read the decrypted view like any file. An ordinary script: it also runs natively.
"""

import torch
from safetensors.torch import load_file

scripted = torch.jit.load("model/model.ts")
weights = load_file("model/model.safetensors")
x = torch.load("data/input.pt", weights_only=True)
with torch.no_grad():
    a = scripted(x)
    b = torch.relu(x @ weights["w1"].T + weights["b1"]) @ weights["w2"].T + weights["b2"]
with open("out/result.txt", "w") as f:
    f.write(f"max difference {float((a - b).abs().max()):.3e}\n")
    for row in a:
        f.write(" ".join(f"{v:.6f}" for v in row.tolist()) + "\n")
