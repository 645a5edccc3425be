from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

INTEL_CASES = {
    # quote, collateral, verify at
    "sgx": ("sgx_quote.bin", "sgx_quote_collateral.json", datetime(2025, 7, 1, tzinfo=UTC)),
    "tdx_v4": (
        "tdx_quote_v4.bin",
        "tdx_quote_v4_collateral.json",
        datetime(2025, 7, 1, tzinfo=UTC),
    ),
    "tdx_v5": (
        "tdx_quote_v5_td15.bin",
        "tdx_quote_v5_td15_collateral.json",
        datetime(2026, 3, 1, tzinfo=UTC),
    ),
}
SNP_AT = datetime(2026, 1, 1, tzinfo=UTC)
REAL_NOW = datetime(2026, 11, 29, tzinfo=UTC)


@pytest.fixture(scope="session")
def att(vectors: Path) -> Path:
    return vectors / "attestation"
