"""Collateral a runner sends may not be older than the broker's own (issue 13.2): the host keeps
stale, validly signed Intel collateral from before a TCB recovery, in which its platform is still
``UpToDate``, and sends that instead of the current one."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shieldml.attest import IntelCollateral
from shieldml.broker.server.config import BrokerConfig
from shieldml.broker.server.release import CollateralFloor, Settings
from shieldml.testing.simulated import SimulatedPlatform
from tests.attest.test_fetch import fake_pcs
from tests.broker.conftest import Broker, release_request
from tests.broker.test_release import add_key, without_collateral


def _numbered(sim: SimulatedPlatform, number: int) -> IntelCollateral:
    return sim.collateral("sgx", now=datetime.now(UTC), evaluation_data_number=number)


def _release(b: Broker, sim: SimulatedPlatform, number: int | None) -> Any:
    """A release whose collateral is numbered ``number`` (None: sent without collateral)."""
    body, _ = release_request(b, sim, ["model"])
    if number is None:
        body = without_collateral(body)
    else:
        body["collateral"] = json.loads(_numbered(sim, number).to_json())
    return b.client.post("/v1/release", json=body)


def test_runner_collateral_older_than_the_brokers_own_is_refused(
    make: Callable[[Settings], Broker], sim: SimulatedPlatform
):
    """The broker holds collateral #5 for the platform's FMSPC; the runner sends #4."""
    b = make(Settings(trust=sim.trust(), own_collateral=lambda _q: _numbered(sim, 5)))
    add_key(b)
    r = _release(b, sim, 4)
    assert r.status_code == 403, r.text
    reasons = json.dumps(r.json()["detail"]["reasons"])
    assert "older than the broker's" in reasons and "tcbEvaluationDataNumber >= 5" in reasons
    assert _release(b, sim, 5).status_code == 200
    assert _release(b, sim, 6).status_code == 200  # newer than the broker's: fine


def test_runner_collateral_older_than_collateral_the_broker_verified_before_is_refused(
    make: Callable[[Settings], Broker], sim: SimulatedPlatform
):
    """No collateral at hand, but the broker verified #5 (its own PCCS's, then a runner's):
    older collateral for the same FMSPC is refused afterwards."""
    b = make(Settings(trust=sim.trust(), collateral_for=lambda _q: _numbered(sim, 5)))
    add_key(b)
    assert _release(b, sim, None).status_code == 200  # the broker's own: #5
    r = _release(b, sim, 4)
    assert r.status_code == 403 and "older than the broker's" in r.text
    assert _release(b, sim, 7).status_code == 200
    assert _release(b, sim, 6).status_code == 403  # the floor rose to #7


def test_collateral_floor_keeps_tees_fmspcs_and_roots_apart():
    floor = CollateralFloor(max_entries=2)
    floor.raise_to(("SGX", "5e0000000000", "simulated"), 5)
    floor.raise_to(("SGX", "5e0000000000", "simulated"), 3)  # it only rises
    assert floor.get(("SGX", "5e0000000000", "simulated")) == 5
    assert floor.get(("TDX", "5e0000000000", "simulated")) is None
    assert floor.get(("SGX", "5e0000000000", "vendor")) is None
    floor.raise_to(("SGX", "00a067110000", "vendor"), 17)
    floor.raise_to(("TDX", "b0c06f000000", "vendor"), 17)
    assert floor.get(("SGX", "5e0000000000", "simulated")) is None  # bounded: oldest went


def test_brokers_own_collateral_comes_from_its_simulated_platform_and_its_cache(
    tmp_path: Path, sim: SimulatedPlatform, vectors: Path
):
    """What ``broker serve`` compares with: a trusted simulated platform's collateral for its
    quotes, the on-disk cache (valid at the time, never fetched) for every other quote."""
    sim.save(tmp_path / "sim")
    cfg = BrokerConfig(
        database="sqlite://", state_dir=str(tmp_path / "state"), simulated_platforms=(str(tmp_path / "sim"),)
    )  # fmt: skip
    own = cfg.own_collateral()
    quote, _ = sim.sgx_quote()
    got = own(quote)
    assert got is not None and json.loads(got.tcb_info)["fmspc"] == "5E0000000000"
    d = vectors / "attestation" / "intel" / "phala"
    real, col = (
        (d / "tdx_quote_v4.bin").read_bytes(),
        IntelCollateral.from_json((d / "tdx_quote_v4_collateral.json").read_text()),
    )
    assert own(real) is None  # nothing cached for it
    from shieldml.attest import CollateralCache

    cache = CollateralCache(tmp_path / "state" / "collateral")
    at = datetime(2025, 7, 1, tzinfo=UTC)
    cache.intel(real, now=at, fetch=fake_pcs(col, "B0C06F000000", tee="tdx", ca="platform"))
    assert cache.cached_intel(real, now=at) == col
    assert cache.cached_intel(real, now=datetime(2026, 11, 29, tzinfo=UTC)) is None  # expired


def test_brokers_own_collateral_is_read_once_per_ttl_and_a_refresh_counts_after_it(
    make: Callable[[Settings], Broker], sim: SimulatedPlatform
):
    """The own collateral's number is remembered for OwnFloor.ttl seconds (reading it on every
    release cost a tenth of the broker's CPU); once the broker's collateral is refreshed to #6,
    the runner's #5 is refused as soon as the remembered #5 is older than the ttl."""
    now = [1000.0]
    held = [5]
    reads: list[int] = []

    def own(_quote: bytes) -> IntelCollateral:
        reads.append(held[0])
        return _numbered(sim, held[0])

    b = make(Settings(trust=sim.trust(), own_collateral=own, monotonic=lambda: now[0]))
    add_key(b)
    assert _release(b, sim, 5).status_code == 200
    assert _release(b, sim, 5).status_code == 200
    assert reads == [5]  # read once
    held[0] = 6  # the broker's cache was refreshed
    now[0] += 9.0
    assert _release(b, sim, 5).status_code == 200  # within the ttl: #5 still stands
    now[0] += 2.0
    r = _release(b, sim, 5)
    assert r.status_code == 403 and "tcbEvaluationDataNumber >= 6" in r.text
    assert reads == [5, 6]


def test_own_floor_keeps_platforms_apart_and_forgets_after_its_ttl():
    from shieldml.broker.server.release import OwnFloor

    now = [0.0]
    floor = OwnFloor(ttl=10.0, max_entries=2, clock=lambda: now[0])
    a, b_, c = (
        ("SGX", "5e0000000000", "simulated"),
        ("TDX", "5e0000000000", "simulated"),
        ("SGX", "00a067110000", "vendor"),
    )
    assert floor.get(a, lambda: 5) == 5
    assert floor.get(a, lambda: 9) == 5  # remembered
    assert floor.get(b_, lambda: None) is None
    assert floor.get(b_, lambda: 7) == 7  # "none at hand" is never remembered
    now[0] = 10.0
    assert floor.get(a, lambda: 9) == 9  # expired: read again
    floor.get(c, lambda: 1)
    assert floor.get(b_, lambda: 3) == 3  # bounded: b_ was the oldest and went
