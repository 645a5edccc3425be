"""The one release decision (``shieldml.broker.server.release``) and the attacks on it (issue 13,
points 1 and 6): a slow PCCS, quotes that make the broker fetch collateral for nobody, key
material unwrapped before a policy accepted, audit floods with bad nonces, challenge floods,
key names outside the one rule."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from shieldml.attest import CollateralCache, IntelCollateral
from shieldml.attest._fetch import Response
from shieldml.broker import protocol
from shieldml.broker.client import BrokerClient
from shieldml.broker.server.app import ChallengeLimiter
from shieldml.broker.server.release import (
    CollateralMisses,
    NonceBinding,
    ReleaseRequest,
    Settings,
    decide,
)
from shieldml.broker.server.storage import Kek, valid_key_name
from shieldml.errors import (
    AttestationError,
    BindingError,
    BrokerError,
    CollateralError,
    NonceError,
    NotGenuineError,
    ReleaseDenied,
    ShieldError,
    UnknownKeyError,
)
from shieldml.testing.simulated import SimulatedPlatform, system_clock
from tests.broker.conftest import MRENCLAVE, POLICY, WD, Broker, release_request

KEY = bytes(range(32))


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def add_key(b: Broker, name: str = "model", policy: str | None = POLICY) -> None:
    b.store.put_key(name, "stream", KEY)
    if policy is not None:
        b.store.set_policy(name, policy)


def without_collateral(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "collateral"}


class CountingFetcher:
    """A PCCS that counts what it is asked and answers 503 (or blocks, then answers)."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, url: str) -> Response:
        with self.lock:
            self.urls.append(url)
        return Response(503, b"", {})


def pccs_source(tmp_path: Path, fetch: CountingFetcher) -> Callable[[bytes], IntelCollateral]:
    """The broker's collateral source as ``broker serve --pccs`` builds it: the on-disk cache,
    refreshed from a PCCS through ``fetch``."""
    cache = CollateralCache(tmp_path / "collateral")

    def source(quote: bytes) -> IntelCollateral:
        return cache.intel(
            quote, now=system_clock(), fetch=fetch, base_url="https://pccs.example:8081"
        )

    return source


# -- point 1: the event loop, collateral only for verified chains, negative cache ------------------


def test_slow_pccs_does_not_block_health(
    make: Callable[[Settings], Broker], sim: SimulatedPlatform
):
    """One release waiting ~2 s on a slow PCCS held ``/v1/health`` for as long (7.7 s in the
    review): the release ran synchronous work inside ``async def``, on the event loop."""
    entered = threading.Event()

    def slow(_quote: bytes) -> IntelCollateral:
        entered.set()
        time.sleep(2.0)
        return sim.collateral("sgx")

    b = make(Settings(trust=sim.trust(), collateral_for=slow))
    add_key(b)
    body, rk = release_request(b, sim, ["model"])
    with TestClient(b.client.app) as client:  # one event loop for every request below
        answers: list[httpx.Response] = []
        t = threading.Thread(
            target=lambda: answers.append(client.post("/v1/release", json=without_collateral(body)))
        )
        t.start()
        assert entered.wait(30), "the release never asked for collateral"
        start = time.monotonic()
        health = client.get("/v1/health")
        took = time.monotonic() - start
        t.join(30)
    assert health.status_code == 200
    assert took < 1.0, f"/v1/health took {took:.2f} s while a release waited on the PCCS"
    assert answers and answers[0].status_code == 200, answers[0].text if answers else "no answer"
    assert rk.open("model", base64.b64decode(answers[0].json()["keys"]["model"]["sealed"])) == KEY


def test_untrusted_pck_chain_triggers_no_pccs_fetch(
    make: Callable[[Settings], Broker], sim: SimulatedPlatform, tmp_path: Path
):
    """A quote whose PCK chain ends in a root nobody trusts (or does not parse) made the broker
    look its FMSPC up at the PCCS before verifying anything."""
    fetch = CountingFetcher()
    b = make(Settings(trust=sim.trust(), collateral_for=pccs_source(tmp_path, fetch)))
    add_key(b)
    stranger = SimulatedPlatform.create(clock=system_clock)  # its root is not trusted here
    body, rk = release_request(b, sim, ["model"])
    nonce = bytes.fromhex(body["nonce"])
    quote, _ = stranger.sgx_quote(
        report_data=protocol.report_data(nonce, rk.kem_id, rk.public_bytes, WD),
        mrenclave=MRENCLAVE,
    )
    r = b.client.post(
        "/v1/release",
        json={**without_collateral(body), "evidence": base64.b64encode(quote).decode()},
    )
    assert r.status_code == 403 and r.json()["detail"]["reason"] == "evidence is not genuine"
    assert "untrusted root" in json.dumps(r.json()["detail"]["reasons"])
    # garbage in place of the chain: refused as well, and nothing asked either
    body, _ = release_request(b, sim, ["model"])
    good = base64.b64decode(body["evidence"])
    begin = good.index(b"-----BEGIN CERTIFICATE-----")
    garbage = good[:begin] + b"\x00" * (len(good) - begin)
    r = b.client.post(
        "/v1/release",
        json={**without_collateral(body), "evidence": base64.b64encode(garbage).decode()},
    )
    assert r.status_code == 403
    assert fetch.urls == [], f"the PCCS was asked for an unverified platform: {fetch.urls}"


def test_repeated_bad_quote_does_not_refetch_collateral(
    make: Callable[[Settings], Broker], sim: SimulatedPlatform, tmp_path: Path
):
    """A quote whose collateral lookup failed (the PCCS answered 503) sent again with fresh
    nonces: every attempt asked the PCCS again."""
    fetch = CountingFetcher()
    b = make(Settings(trust=sim.trust(), collateral_for=pccs_source(tmp_path, fetch)))
    add_key(b)
    body, _ = release_request(b, sim, ["model"])
    for _ in range(3):
        fresh = b.client.post("/v1/challenge").json()["nonce"]
        r = b.client.post("/v1/release", json={**without_collateral(body), "nonce": fresh})
        assert r.status_code == 403, r.text
        assert "HTTP 503" in json.dumps(r.json()["detail"]["reasons"])
    assert len(fetch.urls) == 1, f"the same bad quote was fetched for again: {fetch.urls}"
    # another quote from the same platform is not refused by that entry: it asks again
    body2, _ = release_request(b, sim, ["model"])
    assert b.client.post("/v1/release", json=without_collateral(body2)).status_code == 403
    assert len(fetch.urls) == 2


def test_collateral_misses_are_bounded_and_expire():
    clock = Clock()
    misses = CollateralMisses(ttl=5.0, max_entries=2, clock=clock)
    err = CollateralError("fetch", "PCCS down")
    for q in (b"q1", b"q2", b"q3"):
        misses.put(q, err)
    assert len(misses) == 2 and misses.get(b"q1") is None  # the oldest went first
    assert misses.get(b"q3") is err and misses.get(b"q3 ") is None  # exact bytes only
    clock.t += 5.0
    assert misses.get(b"q2") is None and misses.get(b"q3") is None


def test_key_material_is_unwrapped_only_after_every_policy_accepted(
    make: Callable[[Settings], Broker], sim: SimulatedPlatform, monkeypatch: pytest.MonkeyPatch
):
    """``key_with_policy`` unwrapped every requested key before any policy had been asked: a
    release denied for one key had the other keys' material in memory already."""
    b = make(Settings(trust=sim.trust()))
    add_key(b, "model")
    add_key(b, "data", policy=POLICY.replace(MRENCLAVE.hex(), "00" * 32))  # denies this enclave
    unwrapped: list[str] = []
    real = Kek.unwrap

    def spy(self: Kek, name: str, fmt: str, wrapped: bytes) -> bytes:
        unwrapped.append(name)
        return real(self, name, fmt, wrapped)

    monkeypatch.setattr(Kek, "unwrap", spy)
    body, _ = release_request(b, sim, ["model", "data"])
    r = b.client.post("/v1/release", json=body)
    assert r.status_code == 403 and set(r.json()["detail"]["verdicts"]) == {"data"}
    assert unwrapped == [], f"unwrapped before every policy accepted: {unwrapped}"
    body, _ = release_request(b, sim, ["model"])
    assert b.client.post("/v1/release", json=body).status_code == 200
    assert unwrapped == ["model"]


# -- the core: one distinct error per refusal, one audit record per decision ----------------------


def _request(b: Broker, sim: SimulatedPlatform, keys: list[str], **kw: Any) -> ReleaseRequest:
    body, rk = release_request(b, sim, keys, **kw)
    nonce = bytes.fromhex(body["nonce"])
    return ReleaseRequest(
        evidence=base64.b64decode(body["evidence"]),
        keys=keys,
        binding=NonceBinding(
            nonce, protocol.report_data(nonce, rk.kem_id, rk.public_bytes, WD), WD
        ),
        collateral=body["collateral"],
    )


def test_decide_raises_a_distinct_error_per_refusal_and_audits_each_once(
    make: Callable[[Settings], Broker], sim: SimulatedPlatform
):
    b = make(Settings(trust=sim.trust()))
    add_key(b, "model")
    add_key(b, "nopolicy", policy=None)
    store, cfg = b.store, Settings(trust=sim.trust())

    def refused(req: ReleaseRequest, cls: type[BrokerError], status: int) -> BrokerError:
        before = store.audit_head().seq
        with pytest.raises(cls) as info:
            decide(store, cfg, req)
        assert info.value.status == status
        assert store.audit_head().seq == before + 1, "not exactly one audit record"
        last = store.audit_records(before)[-1]
        assert last.event == "release" and last.data["allowed"] is False
        if isinstance(info.value.detail, dict):
            assert info.value.detail["audit_seq"] == last.seq
        return info.value

    ok = _request(b, sim, ["model"])
    released = decide(store, cfg, ok)
    assert released.keys == {"model": ("stream", KEY)} and released.claims.tee.value == "sgx"
    assert store.audit_records(released.audit_seq - 1)[0].data["allowed"] is True
    refused(ok, NonceError, 409)  # the same nonce again
    req = _request(b, sim, ["model"])
    bad = bytearray(req.evidence)
    bad[100] ^= 1
    err = refused(
        ReleaseRequest(
            evidence=bytes(bad), keys=req.keys, binding=req.binding, collateral=req.collateral
        ),
        NotGenuineError,
        403,
    )
    assert isinstance(err, AttestationError) and err.cause is not None
    refused(_request(b, sim, ["model"], tamper_binding=True), BindingError, 403)
    refused(_request(b, sim, ["model", "absent"]), UnknownKeyError, 404)
    denied = refused(_request(b, sim, ["model", "nopolicy"]), ReleaseDenied, 403)
    assert isinstance(denied, ReleaseDenied)
    assert [v["key"] for v in denied.verdicts] == ["nopolicy"]
    with pytest.raises(BrokerError) as info:  # names outside the rule: refused before anything
        decide(store, cfg, ReleaseRequest(evidence=b"", keys=["mödel"], binding=ok.binding))
    assert info.value.status == 400


def test_client_maps_each_refusal_to_its_error_class(
    make: Callable[[Settings], Broker], sim: SimulatedPlatform
):
    b = make(Settings(trust=sim.trust()))
    add_key(b)
    client = BrokerClient("http://testserver", transport=b.client._transport)  # type: ignore[attr-defined]

    def release(**kw: Any) -> None:
        nonce = client.challenge()
        rk = protocol.RunnerKey.generate()
        rd = (
            bytes(64)
            if kw.get("tamper")
            else protocol.report_data(nonce, rk.kem_id, rk.public_bytes, WD)
        )
        quote, col = sim.sgx_quote(report_data=rd, mrenclave=kw.get("mrenclave", MRENCLAVE))
        if kw.get("flip"):
            quote = quote[:100] + bytes([quote[100] ^ 1]) + quote[101:]
        client.release(
            bytes(32) if kw.get("bad_nonce") else nonce, rk, WD, kw.get("keys", ["model"]),
            quote, collateral=json.loads(col.to_json()),
        )  # fmt: skip

    release()
    for kw, cls in [
        ({"bad_nonce": True}, NonceError),
        ({"flip": True}, NotGenuineError),
        ({"tamper": True}, BindingError),
        ({"keys": ["absent"]}, UnknownKeyError),
        ({"mrenclave": b"\x01" * 32}, ReleaseDenied),
    ]:
        with pytest.raises(cls):
            release(**kw)
    client.close()


# -- point 6: bounded and quiet ---------------------------------------------------------------


def test_bad_nonce_floods_no_request_data_into_the_audit_log(
    make: Callable[[Settings], Broker], sim: SimulatedPlatform
):
    """281 requests with an unknown nonce grew the audit log by 285 MB in 15 s: each refusal
    stored the request's key list, whose names had no length limit."""
    b = make(Settings(trust=sim.trust()))
    add_key(b)
    body, _ = release_request(b, sim, ["model"])
    before = b.store.audit_head().seq
    names = [f"{i:03d}" + "k" * 125 for i in range(32)]  # the longest list of the longest names
    for i in range(5):
        r = b.client.post("/v1/release", json={**body, "nonce": f"{i:064x}", "keys": names})
        assert r.status_code == 409, r.text
    records = b.store.audit_records(before)
    assert len(records) == 5
    for rec in records:
        text = json.dumps(rec.data)
        assert "kkkk" not in text and WD not in text, f"request data in the log: {text[:200]}"
        assert len(text) < 256, f"a {len(text)}-character record for a bad nonce"
    # names over the limit are refused before anything is written
    huge = ["k" * 30_000] * 32
    r = b.client.post("/v1/release", json={**body, "nonce": "ab" * 32, "keys": huge})
    assert r.status_code == 422
    assert b.store.audit_head().seq == before + 5


def test_unicode_key_names_are_refused_by_one_rule(
    make: Callable[[Settings], Broker], sim: SimulatedPlatform
):
    """The store accepted any Unicode letter or digit (``isalnum``: "model" with a Cyrillic o,
    an Arabic-Indic digit), the API only ASCII: a key the API could never name, look-alikes in
    the audit log."""
    b = make(Settings(trust=sim.trust()))
    for bad in ("m\u043edel", "\u0663", "model\n", "", "k" * 129, "a/b", "a b"):
        assert not valid_key_name(bad)
        with pytest.raises(ShieldError):
            b.store.put_key(bad, "stream", KEY)
        r = b.client.post(
            "/v1/admin/keys", json={"name": bad, "key": base64.b64encode(KEY).decode()},
            headers=b.admin(),
        )  # fmt: skip
        assert r.status_code == 422, (bad, r.text)
    for good in ("model", "a.b-c_D9", "k" * 128):
        assert valid_key_name(good)
    add_key(b)
    body, _ = release_request(b, sim, ["model"])
    r = b.client.post("/v1/release", json={**body, "keys": ["model", "m\u043edel"]})
    assert r.status_code == 422


def test_challenge_flood_from_one_address_is_rate_limited(
    make: Callable[[Settings], Broker], sim: SimulatedPlatform
):
    """Challenges were unlimited: one client could create nonces (and audit records) as fast as
    the database took them."""
    clock = Clock()
    b = make(Settings(trust=sim.trust(), challenge_rate=2.0, challenge_burst=3, monotonic=clock))
    before = b.store.audit_head().seq
    assert [b.client.post("/v1/challenge").status_code for _ in range(3)] == [200] * 3
    r = b.client.post("/v1/challenge")
    assert r.status_code == 429 and "too many challenges" in r.json()["detail"]
    assert r.headers["Retry-After"] == "1"
    assert b.store.audit_head().seq == before + 3  # a refused challenge writes nothing
    clock.t += 0.5  # one token back
    assert b.client.post("/v1/challenge").status_code == 200
    assert b.client.post("/v1/challenge").status_code == 429
    with pytest.raises(BrokerError) as info:
        BrokerClient("http://testserver", transport=b.client._transport).challenge()  # type: ignore[attr-defined]
    assert info.value.status == 429


def test_challenge_limiter_keeps_addresses_apart_and_bounded():
    clock = Clock()
    lim = ChallengeLimiter(rate=1.0, burst=1, clock=clock, max_clients=2)
    assert lim.take("10.0.0.1") == 0 and lim.take("10.0.0.1") == pytest.approx(1.0)
    assert lim.take("10.0.0.2") == 0  # another address has its own bucket
    assert lim.take("10.0.0.3") == 0 and len(lim._buckets) == 2
    assert ChallengeLimiter(rate=0, burst=0, clock=clock).take("x") == 0  # 0: no limit
