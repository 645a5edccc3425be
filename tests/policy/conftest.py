from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from shieldml.attest import Claims, IntelCollateral, verify_evidence


@pytest.fixture(scope="module")
def sgx_claims(vectors: Path) -> Claims:
    """The real SGX vector, verified at a fixed time (its TCB info and QE identity are
    tcbEvaluationDataNumber 17)."""
    d = vectors / "attestation" / "intel" / "phala"
    col = IntelCollateral.from_json((d / "sgx_quote_collateral.json").read_text())
    return verify_evidence(
        (d / "sgx_quote.bin").read_bytes(), collateral=col, now=datetime(2025, 7, 1, tzinfo=UTC)
    )
