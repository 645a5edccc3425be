"""Shared fixtures: the vectors folder (``SHIELDML_VECTORS``, default ``../shared/vectors``)."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg import PgCluster

REPO = Path(__file__).resolve().parent.parent


def sgx_policy(mrenclave: bytes, workload_digest: str, **extra: str) -> str:
    """A release policy for the simulated SGX enclave ``mrenclave``; ``workload_digest`` and
    ``extra`` values are TOML (e.g. ``'"any"'`` or ``'["sha256:..."]'``)."""
    lines = [
        "[[profile]]", 'tee = "sgx"', f'mrenclave = ["{mrenclave.hex()}"]', 'mrsigner = "any"',
        "isv_prod_id = 0", "min_isv_svn = 0", f"workload_digest = {workload_digest}",
        "insecure_allow_simulated = true", *(f"{k} = {v}" for k, v in extra.items()),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def fuzz_examples(default: int) -> int:
    """Examples per property test: small in `make test`, large under `make fuzz`."""
    scale = os.environ.get("SHIELDML_FUZZ_EXAMPLES")
    return max(default, int(scale)) if scale else default


def vectors_dir() -> Path | None:
    env = os.environ.get("SHIELDML_VECTORS")
    path = Path(env) if env else REPO.parent / "shared" / "vectors"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def vectors() -> Path:
    path = vectors_dir()
    if path is None:
        pytest.skip("vectors not found: set SHIELDML_VECTORS to shared/vectors")
    return path


def vector_plaintext(n: int) -> bytes:
    """The plaintext of the gramine-pf vectors (their README): SHA-256 counter stream."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(b"shieldml-vector" + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:n])


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One throw-away PostgreSQL cluster per test session (skipped if the binaries are absent)."""
    cluster = PgCluster()
    reason = cluster.available
    if reason:
        pytest.skip(reason)
    cluster.start()
    yield cluster
    cluster.stop()


_db_counter = itertools.count()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh, empty database in the session's cluster."""
    return pg_cluster.create_database(f"test_{os.getpid()}_{next(_db_counter)}")


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated platform's directory (on the system clock), one per test module."""
    from shieldml.testing.simulated import SimulatedPlatform, system_clock

    d = tmp_path_factory.mktemp("simplatform")
    SimulatedPlatform.open(d, clock=system_clock)
    return d


def gramine_pf_dir() -> Path | None:
    """Gramine's own ``pf-crypt`` builds (``SHIELDML_GRAMINE_PF``, default
    ``../shared/tools/gramine-pf``: ``v1.8/pf-crypt``, ``v1.9/pf-crypt``)."""
    env = os.environ.get("SHIELDML_GRAMINE_PF")
    path = Path(env) if env else REPO.parent / "shared" / "tools" / "gramine-pf"
    return path if path.is_dir() else None


def pf_crypt_tool(version: str) -> Path:
    """The ``pf-crypt`` of Gramine ``version`` ("v1.8", "v1.9"); skips the test when absent."""
    root = gramine_pf_dir()
    tool = root / version / "pf-crypt" if root is not None else None
    if tool is None or not os.access(tool, os.X_OK):
        pytest.skip(f"Gramine's pf-crypt {version} not found: set SHIELDML_GRAMINE_PF")
    return tool
