"""The quickstart's job: classify four points with the protected model; write the predictions.

Inside `shieldml run`, /workload/model.pt is the decrypted model (the key was released to this
attested TEE only) and what is written to /workload/out/ leaves the TEE encrypted.
"""

import torch

torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
model.load_state_dict(torch.load("/workload/model.pt", weights_only=True))
model.eval()
points = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [2.0, 0.5], [-0.5, -2.0]])
with torch.no_grad():
    predictions = model(points).argmax(dim=1).tolist()
with open("/workload/out/predictions.txt", "w") as f:
    for p, c in zip(points.tolist(), predictions, strict=True):
        f.write(f"{p[0]:+.1f} {p[1]:+.1f} -> class {c}\n")
print(f"classified {len(predictions)} points")
