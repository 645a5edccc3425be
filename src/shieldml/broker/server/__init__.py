"""The key broker an owner runs (owner side; needs the ``[broker]`` extra).

- :mod:`.config`: what ``shieldml broker serve`` starts with, its TLS certificate, the trust
  anchors and collateral source it verifies evidence with;
- :mod:`.app`: the HTTP API (FastAPI) and the release decision;
- :mod:`.storage`: keys wrapped under the key-encryption key, policies, nonces, the audit chain
  (SQLite or PostgreSQL through SQLAlchemy);
- :mod:`.secret_prov`: Gramine's RA-TLS secret provisioning protocol (pyOpenSSL);
- :mod:`.http`: the uvicorn protocol that bounds slow request headers.
"""

from __future__ import annotations

try:
    import fastapi as _fastapi  # noqa: F401
    import sqlalchemy as _sqlalchemy  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only on an install without the extra
    raise ImportError(
        f"the key broker needs the [broker] extra ({e.name} is missing): "
        "pip install 'shieldml[broker]'"
    ) from e

from shieldml.broker.server.app import Settings, create_app
from shieldml.broker.server.config import BrokerConfig, TlsFiles, app_from_env, self_signed
from shieldml.broker.server.storage import Kek, Store

__all__ = [
    "BrokerConfig",
    "Kek",
    "Settings",
    "Store",
    "TlsFiles",
    "app_from_env",
    "create_app",
    "self_signed",
]
