"""A digits classifier over HTTP: FastAPI + uvicorn + a small PyTorch model. Nothing here knows
about shieldml; under `shieldml serve` it reads its decrypted model from the same path.

    python server.py 8000            # listens on 127.0.0.1:8000, reads model/model.pt

POST /predict {"pixels": [64 numbers 0..16]} -> {"digit": d, "probabilities": [...]}
GET  /stream?n=8                               -> the probabilities, streamed line by line
GET  /health                                   -> {"ok": true}
"""

import json
import sys
import time

import torch
import uvicorn
from digits_mlp import DigitsMLP
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

torch.set_num_threads(1)

model = DigitsMLP()
model.load_state_dict(torch.load("model/model.pt", weights_only=True))
model.eval()
app = FastAPI()


class Image(BaseModel):
    pixels: list[float]


@app.get("/health")
def health() -> dict[str, bool]:
    return {"ok": True}


@app.post("/predict")
def predict(image: Image) -> dict[str, object]:
    if len(image.pixels) != 64:
        return {"error": "64 pixels expected"}
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([image.pixels])), dim=1)[0]
    return {"digit": int(p.argmax()), "probabilities": [round(float(v), 4) for v in p]}


@app.get("/stream")
def stream(n: int = 8) -> StreamingResponse:
    def tokens():  # a stand-in for token streaming: one line at a time
        for i in range(max(0, min(n, 64))):
            yield json.dumps({"token": i}) + "\n"
            time.sleep(0.02)

    return StreamingResponse(tokens(), media_type="application/x-ndjson")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
