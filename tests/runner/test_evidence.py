"""Evidence providers against fake configfs-tsm and /dev/attestation trees."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shieldml.attest import Quote, SnpReport, TeeKind
from shieldml.runner.evidence import (
    ConfigfsTsmProvider,
    EvidenceError,
    GramineProvider,
    SimulatedProvider,
    provider_for,
)
from shieldml.testing.simulated import SimulatedPlatform, system_clock


class FakeTsm:
    """Plays the kernel: for each new entry with an inblob, produce outblob (and provider, auxblob)."""

    def __init__(self, root: Path, sim: SimulatedPlatform, kind: str) -> None:
        self.root, self.sim, self.kind = root, sim, kind
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            for entry in self.root.glob("*/inblob"):
                out = entry.parent / "outblob"
                if out.exists():
                    continue
                rd = entry.read_bytes()
                if len(rd) != 64:
                    continue
                if self.kind == "tdx":
                    quote, _ = self.sim.tdx_quote(report_data=rd)
                    (entry.parent / "provider").write_text("tdx_guest\n")
                    out.write_bytes(quote)
                else:
                    report, _, _ = self.sim.snp_report(report_data=rd)
                    (entry.parent / "provider").write_text("sev_guest\n")
                    (entry.parent / "auxblob").write_bytes(self.sim.snp_cert_table())
                    out.write_bytes(report)
            time.sleep(0.005)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.open(tmp_path_factory.mktemp("sim"), clock=system_clock)


@pytest.fixture(params=["tdx", "snp"])
def tsm(
    request: pytest.FixtureRequest, tmp_path: Path, sim: SimulatedPlatform
) -> Iterator[tuple[Path, str]]:
    fake = FakeTsm(tmp_path, sim, request.param)
    yield tmp_path, request.param
    fake.stop.set()


def test_configfs_tsm(tsm: tuple[Path, str]):
    root, kind = tsm
    rd = bytes(range(64))
    ev = ConfigfsTsmProvider(root, timeout=10).evidence(rd)
    assert ev.tee == kind
    if kind == "tdx":
        assert Quote.from_bytes(ev.data).body.report_data == rd
    else:
        assert SnpReport.from_bytes(ev.data).report_data == rd and ev.vcek
    assert list(root.iterdir()) == []  # the entry was removed


def test_configfs_tsm_missing(tmp_path: Path):
    with pytest.raises(EvidenceError, match="cannot create a report entry"):
        ConfigfsTsmProvider(tmp_path / "absent").evidence(bytes(64))


def test_gramine_dev_attestation(tmp_path: Path, sim: SimulatedPlatform):
    stop = threading.Event()

    def kernel() -> None:  # what Gramine's /dev/attestation does, as a file tree
        seen = 0.0
        while not stop.is_set():
            f = tmp_path / "user_report_data"
            if f.exists() and f.stat().st_mtime != seen:
                seen = f.stat().st_mtime
                (tmp_path / "quote").write_bytes(sim.sgx_quote(report_data=f.read_bytes())[0])
            time.sleep(0.005)

    t = threading.Thread(target=kernel, daemon=True)
    t.start()
    try:
        rd = b"\x42" * 64
        ev = GramineProvider(tmp_path, timeout=10).evidence(rd)
        assert ev.tee == "sgx" and Quote.from_bytes(ev.data).body.report_data == rd
    finally:
        stop.set()


def test_simulated_provider_and_selection(tmp_path: Path, sim: SimulatedPlatform):
    sim.save(tmp_path / "p")
    ev = SimulatedProvider(tmp_path / "p", "sgx", {"mrenclave": "11" * 32}).evidence(bytes(64))
    assert ev.collateral and Quote.from_bytes(ev.data).body.mr_enclave == b"\x11" * 32  # type: ignore[union-attr]
    with pytest.raises(EvidenceError, match="platform"):
        provider_for("simulated", {})
    assert provider_for("tdx").name == "configfs-tsm" and provider_for("gramine").name == "gramine"


@pytest.mark.parametrize("kind", [k.value for k in TeeKind])
def test_the_simulated_kinds_are_the_tee_kinds(tmp_path: Path, sim: SimulatedPlatform, kind: str):
    sim.save(tmp_path / "p")
    assert SimulatedProvider(tmp_path / "p", kind).evidence(bytes(64)).tee == kind


def test_an_unknown_simulated_kind_names_the_tee_kinds(tmp_path: Path, sim: SimulatedPlatform):
    sim.save(tmp_path / "p")
    with pytest.raises(EvidenceError, match="must be sgx, tdx or snp, not 'ratls'"):
        SimulatedProvider(tmp_path / "p", "ratls")
