"""Classify data/test_images.pt with model/model.pt; write predictions/predictions.pt."""

import torch
from digits_net import DigitsNet

torch.set_num_threads(2)
model = DigitsNet()
model.load_state_dict(torch.load("model/model.pt", weights_only=True))
model.eval()
images = torch.load("data/test_images.pt", weights_only=True)
with torch.no_grad():
    predictions = model(images).argmax(dim=1)
torch.save(predictions, "predictions/predictions.pt")
print(f"classified {len(images)} images")
