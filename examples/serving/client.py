"""Classify a few digits through the attested transport: nothing is sent before the server's
fresh evidence, bound to this connection's TLS key, satisfies the policy.

    python examples/serving/client.py https://127.0.0.1:8443 policy.toml samples.json \\
        [--simulated-platform sim-platform]
"""

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

import httpx

from shieldml.client import AttestedTransport, Verifier
from shieldml.policy import Policy

ap = argparse.ArgumentParser()
ap.add_argument("url")
ap.add_argument("policy")
ap.add_argument("samples")
ap.add_argument("--simulated-platform")
a = ap.parse_args()

trust = None
if a.simulated_platform:  # tests and demos only: the policy must also allow simulated evidence
    from shieldml.testing.simulated import SimulatedPlatform, fixed_clock

    trust = SimulatedPlatform.open(
        a.simulated_platform, clock=fixed_clock(datetime.now(UTC))
    ).trust()
verifier = Verifier(Policy.from_toml(Path(a.policy).read_text(), a.policy), trust=trust)
transport = AttestedTransport(verifier)
with httpx.Client(transport=transport, base_url=a.url) as client:
    for s in json.loads(Path(a.samples).read_text()):
        r = client.post("/predict", json={"pixels": s["pixels"]}).json()
        print(f"label {s['label']} predicted {r['digit']}")
peer = transport.attested[0]
print(
    f"attested {peer.claims.tee.value} TEE running {peer.workload_digest} (TLS key {peer.spki_sha256[:16]}…)"
)
