"""The broker API end to end on SQLite with simulated SGX evidence."""

from __future__ import annotations

import base64
import json

import pytest

from shieldml.broker.audit import verify_chain
from shieldml.testing.simulated import SimulatedPlatform
from tests.broker.conftest import POLICY, Broker, release_request

KEY = bytes(range(32))


def setup_key(
    b: Broker, name: str = "model", policy: str | None = POLICY, key: bytes = KEY
) -> None:
    r = b.client.post(
        "/v1/admin/keys",
        json={"name": name, "key": base64.b64encode(key).decode()},
        headers=b.admin(),
    )
    assert r.status_code == 201, r.text
    if policy is not None:
        r = b.client.put(f"/v1/admin/keys/{name}/policy", json={"toml": policy}, headers=b.admin())
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("kem", ["X25519", "MLKEM768-X25519"])
def test_release_to_attested_runner(broker: Broker, sim: SimulatedPlatform, kem: str):
    setup_key(broker)
    body, rk = release_request(broker, sim, ["model"], kem=kem)
    r = broker.client.post("/v1/release", json=body)
    assert r.status_code == 200, r.text
    sealed = base64.b64decode(r.json()["keys"]["model"]["sealed"])
    assert rk.open("model", sealed) == KEY
    assert r.json()["tee"] == "sgx"


def test_nonce_is_single_use(broker: Broker, sim: SimulatedPlatform):
    setup_key(broker)
    body, _ = release_request(broker, sim, ["model"])
    assert broker.client.post("/v1/release", json=body).status_code == 200
    r = broker.client.post("/v1/release", json=body)
    assert r.status_code == 409 and "already used" in r.json()["detail"]


def test_unknown_nonce(broker: Broker, sim: SimulatedPlatform):
    setup_key(broker)
    body, _ = release_request(broker, sim, ["model"])
    body["nonce"] = "00" * 32
    assert broker.client.post("/v1/release", json=body).status_code == 409


def test_binding_must_match(broker: Broker, sim: SimulatedPlatform):
    setup_key(broker)
    body, _ = release_request(broker, sim, ["model"], tamper_binding=True)
    r = broker.client.post("/v1/release", json=body)
    assert r.status_code == 403 and "bind" in r.json()["detail"]["reason"]


def test_policy_denial_carries_the_verdict(broker: Broker, sim: SimulatedPlatform):
    setup_key(broker)
    body, _ = release_request(broker, sim, ["model"], mrenclave=b"\x01" * 32)
    r = broker.client.post("/v1/release", json=body)
    assert r.status_code == 403
    verdict = r.json()["detail"]["verdicts"]["model"]
    failed = [c for c in verdict["profiles"][0]["checks"] if not c["passed"]]
    assert [c["name"] for c in failed] == ["mrenclave"] and failed[0]["hint"]


def test_modified_workload_is_denied(broker: Broker, sim: SimulatedPlatform):
    setup_key(broker)
    body, _ = release_request(broker, sim, ["model"], wd="sha256:" + "ee" * 32)
    r = broker.client.post("/v1/release", json=body)
    assert r.status_code == 403
    checks = r.json()["detail"]["verdicts"]["model"]["profiles"][0]["checks"]
    assert [c["name"] for c in checks if not c["passed"]] == ["workload_digest"]


def test_key_without_policy_is_denied(broker: Broker, sim: SimulatedPlatform):
    setup_key(broker, "data", policy=None)
    body, _ = release_request(broker, sim, ["data"])
    r = broker.client.post("/v1/release", json=body)
    assert r.status_code == 403 and "denied by default" in json.dumps(r.json())


def test_unknown_key(broker: Broker, sim: SimulatedPlatform):
    body, _ = release_request(broker, sim, ["nope"])
    assert broker.client.post("/v1/release", json=body).status_code == 404


def test_untrusted_evidence(broker: Broker, sim: SimulatedPlatform):
    setup_key(broker)
    body, _ = release_request(broker, sim, ["model"])
    raw = bytearray(base64.b64decode(body["evidence"]))
    raw[100] ^= 1
    body["evidence"] = base64.b64encode(bytes(raw)).decode()
    r = broker.client.post("/v1/release", json=body)
    assert r.status_code == 403 and r.json()["detail"]["reason"] == "evidence is not genuine"


def test_quote_with_a_malformed_chain_certificate_is_403_not_500(
    broker: Broker, sim: SimulatedPlatform
):
    """The atheris finding: a PCK chain certificate whose subject fails lazy decoding."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from tests.attest.test_certs import bad_subject, pem

    setup_key(broker)
    body, _ = release_request(broker, sim, ["model"])
    good = pem(sim.intel_root.public_bytes(Encoding.DER))
    bad = pem(bad_subject(sim.intel_root.public_bytes(Encoding.DER)))
    quote = base64.b64decode(body["evidence"])
    assert good in quote
    body["evidence"] = base64.b64encode(quote.replace(good, bad)).decode()
    r = broker.client.post("/v1/release", json=body)
    assert r.status_code == 403, r.text
    assert "PCK chain" in json.dumps(r.json()["detail"]["reasons"])


@pytest.mark.parametrize(
    ("patch", "status"),
    [
        ({"evidence": "not base64!!"}, 400),
        ({"hpke_public_key": base64.b64encode(b"short").decode()}, 400),
        ({"workload_digest": "md5:00"}, 422),
        ({"keys": []}, 422),
        ({"nonce": "xyz"}, 422),
    ],
)
def test_malformed_requests_get_4xx(
    broker: Broker, sim: SimulatedPlatform, patch: dict[str, object], status: int
):
    setup_key(broker)
    body, _ = release_request(broker, sim, ["model"])
    body.update(patch)
    r = broker.client.post("/v1/release", json=body)
    assert r.status_code == status, r.text


def test_oversized_body(broker: Broker):
    r = broker.client.post(
        "/v1/release",
        content=b"{" + b" " * (2 << 20) + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413


def test_admin_needs_token(broker: Broker):
    assert broker.client.get("/v1/admin/keys").status_code == 401
    assert (
        broker.client.get("/v1/admin/keys", headers={"Authorization": "Bearer wrong"}).status_code
        == 401
    )
    r = broker.client.put(
        "/v1/admin/keys/x/policy", json={"toml": "x"}, headers={"Authorization": "Bearer nope"}
    )
    assert r.status_code == 401


def test_bad_policy_is_rejected(broker: Broker):
    setup_key(broker, policy=None)
    r = broker.client.put(
        "/v1/admin/keys/model/policy",
        json={"toml": "[[profile]]\ntee='sgx'"},
        headers=broker.admin(),
    )
    assert r.status_code == 400 and "every field must be set" in r.json()["detail"]


def test_audit_log_is_a_chain_without_key_material(broker: Broker, sim: SimulatedPlatform):
    setup_key(broker)
    body, _ = release_request(broker, sim, ["model"])
    broker.client.post("/v1/release", json=body)
    broker.client.post("/v1/release", json=body)  # replay, audited as refused
    doc = broker.client.get("/v1/admin/audit", headers=broker.admin()).json()
    events = [(r["event"], r["data"].get("allowed")) for r in doc["records"]]
    assert ("release", True) in events and ("release", False) in events
    text = json.dumps(doc)
    assert KEY.hex() not in text and base64.b64encode(KEY).decode() not in text
    records = broker.store.audit_records()
    assert verify_chain(records, broker.store.audit_head()) == broker.store.audit_head()


def test_openapi_is_published(broker: Broker):
    doc = broker.client.get("/openapi.json").json()
    assert "/v1/release" in doc["paths"] and "/v1/challenge" in doc["paths"]
