"""What an operator needs (issue 14, broker operability): policy get/list/rm, key rm, admin
token rotation, Prometheus metrics, and a structured access-log line per request and denial."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from shieldml.broker.server.storage import Store
from shieldml.cli import main
from shieldml.testing.simulated import SimulatedPlatform
from tests.broker.conftest import POLICY, Broker, release_request

KEY = bytes(range(32))


def add(b: Broker, name: str = "model") -> None:
    assert (
        b.client.post(
            "/v1/admin/keys", json={"name": name, "format": "stream"}, headers=b.admin()
        ).status_code
        == 201
    )
    assert (
        b.client.put(
            f"/v1/admin/keys/{name}/policy", json={"toml": POLICY}, headers=b.admin()
        ).status_code
        == 200
    )


def release(b: Broker, sim: SimulatedPlatform, **kw: object) -> int:
    body, _ = release_request(b, sim, ["model"], **kw)  # type: ignore[arg-type]
    return b.client.post("/v1/release", json=body).status_code


def test_policy_get_list_rm_and_key_rm(broker: Broker, sim: SimulatedPlatform):
    add(broker)
    h = broker.admin()
    got = broker.client.get("/v1/admin/keys/model/policy", headers=h).json()
    assert got["toml"] == POLICY and got["sha256"] == hashlib.sha256(POLICY.encode()).hexdigest()
    assert [p["name"] for p in broker.client.get("/v1/admin/policies", headers=h).json()] == [
        "model"
    ]
    assert broker.client.get("/v1/admin/policies").status_code == 401  # admin only
    assert release(broker, sim) == 200
    assert broker.client.delete("/v1/admin/keys/model/policy", headers=h).status_code == 200
    assert broker.client.get("/v1/admin/keys/model/policy", headers=h).status_code == 404
    assert release(broker, sim) == 403  # no policy: denied by default
    assert broker.client.delete("/v1/admin/keys/model/policy", headers=h).status_code == 404
    assert broker.client.delete("/v1/admin/keys/model", headers=h).json()["had_policy"] is False
    assert release(broker, sim) == 404
    assert broker.client.delete("/v1/admin/keys/model", headers=h).status_code == 404
    events = [r.event for r in broker.store.audit_records(0, 1000)]
    assert "policy_removed" in events and "key_removed" in events


def test_metrics_count_releases_by_outcome_and_refusal_kind(broker: Broker, sim: SimulatedPlatform):
    add(broker)
    assert release(broker, sim) == 200
    assert release(broker, sim, mrenclave=b"\x01" * 32) == 403
    assert release(broker, sim, tamper_binding=True) == 403
    r = broker.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'shieldml_releases_total{outcome="allowed",reason=""} 1.0' in text
    assert 'shieldml_releases_total{outcome="denied",reason="policy_denied"} 1.0' in text
    assert 'shieldml_releases_total{outcome="denied",reason="binding"} 1.0' in text
    assert 'shieldml_request_seconds_count{route="/v1/release"} 3.0' in text
    nonces = next(line for line in text.splitlines() if line.startswith("shieldml_nonces "))
    assert float(nonces.split()[1]) == 3.0
    assert "model" not in text  # counts only: no key names


def test_each_request_and_each_denial_is_one_json_log_line(
    broker: Broker, sim: SimulatedPlatform, caplog: pytest.LogCaptureFixture
):
    add(broker)
    with caplog.at_level(logging.INFO, logger="shieldml.broker.access"):
        caplog.clear()
        assert release(broker, sim, mrenclave=b"\x01" * 32) == 403
    lines = [
        json.loads(r.getMessage()) for r in caplog.records if r.name == "shieldml.broker.access"
    ]
    requests = [x for x in lines if "route" in x]
    assert [(x["method"], x["route"], x["status"]) for x in requests] == [
        ("POST", "/v1/challenge", 200),
        ("POST", "/v1/release", 403),
    ]
    (denial,) = [x for x in lines if x.get("event") == "release_denied"]
    assert denial["reason"] == "policy_denied" and isinstance(denial["audit_seq"], int)
    assert "mrenclave" in denial["detail"]


def test_rotate_admin_token_voids_the_old_one(tmp_path: Path):
    state = tmp_path / "state"
    store = Store(f"sqlite:///{state}/broker.db", state)
    old = store.init_admin_token()
    assert old is not None
    assert main(["broker", "rotate-admin-token", "--state", str(state)]) == 0
    new = (state / "admin-token").read_text().strip()
    assert (state / "admin-token").stat().st_mode & 0o777 == 0o600
    assert not store.check_admin_token(old) and store.check_admin_token(new)
    assert [r.event for r in store.audit_records(0, 10)][-1] == "admin_token_rotated"
    store.engine.dispose()
    assert main(["broker", "rotate-admin-token", "--state", str(tmp_path / "typo")]) == 1
    assert not (tmp_path / "typo").exists()
