"""The Kubernetes manifests in deploy/ validate against the Kubernetes schemas (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest

kv = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
FILES = sorted(DEPLOY.glob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_manifest_is_valid(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kv.validate(doc, kv.latest_version(), strict=True)
