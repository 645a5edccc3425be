from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shieldml.broker import protocol
from shieldml.broker.server.app import Settings, create_app
from shieldml.broker.server.config import BrokerConfig
from shieldml.broker.server.storage import Store
from shieldml.testing.brokers import BrokerProcess, start_broker
from shieldml.testing.simulated import SimulatedPlatform, system_clock
from shieldml.testing.simulated_gpu import SimulatedGpu, open_gpus
from tests.conftest import sgx_policy

MRENCLAVE = b"\x5a" * 32


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database of each kind the broker supports (PostgreSQL: skipped where absent)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/s.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def stores(db_url: str, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Stores on one database and state directory (a server, a CLI command beside it,
    replicas): each call makes another."""
    made: list[Store] = []

    def new() -> Store:
        s = Store(db_url, tmp_path / "state")
        made.append(s)
        return s

    yield new
    for s in made:
        s.engine.dispose()


def raw_tls_socket(url: str) -> ssl.SSLSocket:
    """A bare TLS connection to a served broker, for clients that misbehave at the HTTP level
    (the certificate is not checked: only what happens to the connection matters)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    return tls.wrap_socket(socket.create_connection((host, int(port)), timeout=10))


WD = "sha256:" + "cd" * 32
POLICY = sgx_policy(MRENCLAVE, f'["{WD}"]')


@pytest.fixture(scope="session")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.open(tmp_path_factory.mktemp("sim"), clock=system_clock)


@dataclass
class Broker:
    client: TestClient
    store: Store
    token: str

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def make_broker(url: str, state: Path, sim: SimulatedPlatform) -> Broker:
    store = Store(url, state)
    token = store.init_admin_token()
    assert token is not None
    app = create_app(store, Settings(trust=sim.trust()))
    return Broker(TestClient(app), store, token)


@pytest.fixture(params=["sqlite", "postgresql"])
def broker(
    request: pytest.FixtureRequest, tmp_path: Path, sim: SimulatedPlatform
) -> Iterator[Broker]:
    """The broker on SQLite and on PostgreSQL (a fresh database in a throw-away cluster)."""
    url = (
        f"sqlite:///{tmp_path}/broker.db"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    b = make_broker(url, tmp_path / "state", sim)
    yield b
    b.store.engine.dispose()


def release_request(
    b: Broker, sim: SimulatedPlatform, keys: list[str], *, mrenclave: bytes = MRENCLAVE, wd: str = WD,
    kem: str = "X25519", tamper_binding: bool = False,
) -> tuple[dict[str, Any], protocol.RunnerKey]:  # fmt: skip
    nonce = bytes.fromhex(b.client.post("/v1/challenge").json()["nonce"])
    rk = protocol.RunnerKey.generate(kem)
    rd = protocol.report_data(nonce, rk.kem_id, rk.public_bytes, wd)
    if tamper_binding:
        rd = bytes(64)
    quote, col = sim.sgx_quote(report_data=rd, mrenclave=mrenclave, now=datetime.now(UTC))
    body = {
        "nonce": nonce.hex(),
        "evidence": base64.b64encode(quote).decode(),
        "collateral": __import__("json").loads(col.to_json()),
        "hpke_kem": kem,
        "hpke_public_key": base64.b64encode(rk.public_bytes).decode(),
        "workload_digest": wd,
        "keys": keys,
    }
    return body, rk


def broker_with(tmp_path: Path, settings: Settings) -> Broker:
    store = Store(f"sqlite:///{tmp_path}/broker.db", tmp_path / "state")
    token = store.init_admin_token()
    assert token is not None
    return Broker(TestClient(create_app(store, settings)), store, token)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[[Settings], Broker]]:
    made: list[Broker] = []

    def factory(settings: Settings) -> Broker:
        b = broker_with(tmp_path / str(len(made)), settings)
        made.append(b)
        return b

    yield factory
    for b in made:
        b.client.close()
        b.store.engine.dispose()


@pytest.fixture
def served(tmp_path: Path, sim_dir: Path) -> Iterator[BrokerProcess]:
    """A real ``broker serve`` process trusting the module's simulated platform."""
    bp = start_broker(tmp_path / "state", "--simulated-platform", str(sim_dir))
    yield bp
    bp.stop()


# -- a simulated platform with its GPU family, and a broker trusting both (GPU release tests) --
@pytest.fixture(scope="module")
def gpu_platform(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("platform")
    SimulatedPlatform.open(d, clock=system_clock)
    return d


@pytest.fixture(scope="module")
def family(gpu_platform: Path) -> list[SimulatedGpu]:
    return open_gpus(gpu_platform, clock=system_clock)


@pytest.fixture
def gpu_broker(
    make: Callable[[Settings], Broker], gpu_platform: Path, tmp_path: Path
) -> tuple[Broker, Settings, SimulatedPlatform]:
    """A broker whose roots are what ``serve --simulated-platform`` trusts."""
    cfg = BrokerConfig(
        database=f"sqlite:///{tmp_path}/cfg.db",
        state_dir=str(tmp_path / "state"),
        simulated_platforms=(str(gpu_platform),),
    )
    settings = Settings(trust=cfg.trust(announce=False), now=system_clock)
    b = make(settings)
    b.store.put_key("model", "stream", bytes(32))
    return b, settings, SimulatedPlatform.open(gpu_platform, clock=system_clock)
