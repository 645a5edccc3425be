"""Fuzz the broker's HTTP API from its own OpenAPI document: never a server error.

A short run inside ``make test``; ``make fuzz`` runs it longer (SHIELDML_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from shieldml.broker.server.app import Settings, create_app
from shieldml.broker.server.storage import Store
from shieldml.testing.simulated import SimulatedPlatform, system_clock

EXAMPLES = int(os.environ.get("SHIELDML_FUZZ_EXAMPLES", "25"))
STATE = Path(tempfile.mkdtemp(prefix="shieldml-fuzz-"))
_store = Store(f"sqlite:///{STATE}/b.db", STATE)
TOKEN = _store.init_admin_token() or ""
_store.put_key("model", "stream", bytes(32), replace=True)
APP = create_app(_store, Settings(trust=SimulatedPlatform.create(clock=system_clock).trust()))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.auth()
class AdminToken:
    def get(self, case: schemathesis.Case, context: schemathesis.AuthContext) -> str:
        return TOKEN

    def set(self, case: schemathesis.Case, data: str, context: schemathesis.AuthContext) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    response = case.call()
    assert response.status_code < 500, (
        f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"
    )
