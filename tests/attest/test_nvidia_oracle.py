"""Our GPU evidence verifier against NVIDIA's own, ``nv-local-gpu-verifier`` 2.7.3, on the vectors.

NVIDIA's verifier runs as an independent oracle in its own virtual environment (``.venv-nvoracle``,
built by ``make nv-oracle``, which ``make test`` runs; its pins conflict with ours), driven by
``scripts/nv_oracle.py`` in one subprocess for all cases. Every case asserts three things: the
vectors README's expectation (accept, or the check that refuses), that our verdict equals NVIDIA's,
and, where NVIDIA reports mismatching measurements, that ours are the same indices (from our
``MeasurementError``; where our verifier refuses before comparing, e.g. on a RIM version or RIM
signature, from our :func:`compare` as ``verify_gpu_evidence`` would call it).

How the oracle is run offline (details in ``scripts/nv_oracle.py``):

* **OCSP call pinned**: ``CcAdminUtils.ocsp_certificate_chain_validation``, which 2.7.3 always calls
  (HTTP to NVIDIA, response signed by NVIDIA's responder, so no local mock can answer), is replaced
  in the oracle's process by a stub that makes no call and answers "good" for every chain. The
  vectors hold no OCSP responses, and our verifier gets none here (it records "not checked"), so
  revocation is *not* compared: E9's certificateHold (live OCSP only) passes on both sides.
* **Clock pinned**: every pyOpenSSL ``X509Store`` the oracle builds (device and RIM chains) and the
  store signxml 3.2.0 uses for RIM signatures get ``set_time(T)``, T = the case's ``now``, inside
  the vectors' validity windows (README §5); ours gets the same ``now=``. Wall-clock independent:
  the suite's libfaketime-shifted rerun gives the same results.
* **RIMs** are read from the vector files (no RIM service), the evidence is fed to NVIDIA's
  ``AttestationReport``/``GpuCertificateChains`` directly (no NVML, no GPU), network calls raise.

Known differences, asserted as such so that a change on either side shows up:

* **E2 as shipped** (one 0x00 byte after the signature): ours accepts it (that single zero byte of
  padding is ignored, any other trailing byte refused); NVIDIA signs "blob minus its last 96
  bytes" and refuses it ("signature verification failed"). With the byte removed both accept.
* **Index 35 (NVDEC0) when the report says NVDEC0 is disabled (0x55)**: ours does not compare it;
  NVIDIA's ``Verifier`` means to skip it too, but compares the raw opaque bytes with an ``Enum``
  member, so its skip never fires and it lists index 35 as a mismatch (E5 with the 570.124.03
  RIM: NVIDIA 16 driver indices, ours 15). Both refuse those cases; no vector pair matches
  everywhere but at 35, so no verdict differs because of it.
* **Which check refuses first** differs in order only (NVIDIA: FWID before signature; versions are
  a warning it flags but a refusal for ours; it requires exactly 5 chain certificates): the
  verdicts agree.

Skipped with the reason when the oracle environment or the vectors are absent. NVSwitch evidence
(S1-S3) is not covered: that verifier is in ``nv-attestation-sdk``, not in this package.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shieldml.attest._nvidia import load_chain, load_evidence_json, verify_gpu_evidence
from shieldml.attest._nvidia_rim import NVDEC_INDEX, Rim, compare
from shieldml.attest._spdm import NVDEC_DISABLED, GpuReport
from shieldml.attest._trust import TrustAnchors, Vendor, fingerprint
from shieldml.errors import AttestationError, MeasurementError
from tests.conftest import REPO, vectors_dir

ORACLE_VENV = Path(os.environ.get("SHIELDML_NV_ORACLE_VENV", REPO / ".venv-nvoracle"))
ORACLE_PY = ORACLE_VENV / "bin" / "python"
SCRIPT = REPO / "scripts" / "nv_oracle.py"

NOW = datetime(2026, 12, 1, tzinfo=UTC)  # the README's "now"
T_2024 = datetime(2024, 6, 1, tzinfo=UTC)  # inside every nvtrust PROD RIM (§5)
T_2025 = datetime(2025, 3, 1, tzinfo=UTC)  # inside 550.144.03 and PROD 5E0001 (§5)
T_MISMATCH = datetime(2025, 9, 1, tzinfo=UTC)  # inside both sample_rims/*GPU*_measurement_mismatch
N1 = "931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb"
N_E2 = "87d8e24ab336adafe228d49e83d745f6dba4ae505372b6a5704820856b343fec"
N_E3 = "5bb22e377702d4e1e8215a903ba094826b9ac7f731dee1fe8102958bf2840aca"
N_E4 = "27a328247bf7935c993341cf587be6f05986ccce4fe7ba2c54100bd616a58f66"
N_E8 = "e97b23a1718095a0e9e35edca810768c70a6a5a389b705e753b197912bc11576"
G = "nvat/testdata/sample_attestation_data/gpu/"
S = "nvtrust/samples/"
SR = "nvat/testdata/sample_rims/"
JSON_EV = "nvat/common-test-data/serialized_test_evidence/"
E1 = (S + "hopperAttestationReport.txt", S + "hopperCertChain.txt")
E2 = ("trustee/hopper_coco_report1.txt", "trustee/hopper_coco_certs1.txt")
E2_TRIMMED = ("@E2-trimmed", E2[1])  # E2 without its trailing 0x00 (written at set-up)
E3 = ("nvat/testdata/hopperAttestationReport.txt", "nvat/testdata/hopperCertChain.txt")
E4 = (G + "hopperAttestationReport.txt", G + "hopperCertChain.txt")
E5 = (G + "hopperAttestationReportExpired.txt", G + "hopperCertChainExpired.txt")
E6 = (G + "hopperAttestationReportInvalidSignature.txt", G + "hopperCertChainExpired.txt")
E7 = (G + "blackwellAttestationReport.txt", G + "blackwellCertChain.txt")
PROD_5E0001 = S + "1010_0200_882_96005E0001_PROD.swidtag"
DRIVER_550 = "nvat/testdata/NV_GPU_DRIVER_GH100_550.144.03.xml"
E1_DRIVER_TEST_NO_GPU = [7, 21, 22, 25, 26, 27, 29, 30, 31, 32, 34, 36, 37, 39, 40]
E5_DRIVER_570 = [7, 21, 22, 25, 26, 27, 29, 30, 31, 32, 34, 36, 37, 39, 40]  # 35: NVDEC0 off
E4_DRIVER_535 = [7, 21, 22, 25, 26, 27, 29, 30, 31, 32, 34, 37, 39, 40, 41]


@dataclass(frozen=True)
class Case:
    name: str
    evidence: tuple[str, str]  # report, chain (vector paths; "@..." = written at set-up)
    nonce: str
    now: datetime = NOW
    driver_rim: str | None = None
    vbios_rim: str | None = None
    wrong_rim_root: bool = False  # nvat/testdata/incorrect_rim_root.crt as the only RIM root
    ours: str | None = None  # None: accept; else the check our verifier refuses with
    nvidia: str | None = None  # None: accept; else NVIDIA's first failing check
    mismatches: tuple[tuple[int, str], ...] = ()  # (RIM index, driver|vbios), both must report
    nvidia_only: tuple[tuple[int, str], ...] = ()  # indices NVIDIA reports and we skip (NVDEC0)
    arch: str = "hopper"  # what NVML would tell NVIDIA's verifier (it does not read the chain)
    note: str = field(default="", compare=False)


def vb(*idx: int) -> tuple[tuple[int, str], ...]:
    return tuple((i, "vbios") for i in idx)


def drv(*idx: int) -> tuple[tuple[int, str], ...]:
    return tuple((i, "driver") for i in idx)


CASES = [
    # -- evidence only: chain, FWID, signature, nonce (README §4.1, §6) --------------------------
    Case("E1", E1, N1),
    Case("E2-trimmed", E2_TRIMMED, N_E2),
    Case("E3", E3, N_E3),
    Case("E4", E4, N_E4),
    Case("E5", E5, N1),
    Case("E7-blackwell", E7, N1, arch="blackwell"),
    *(Case(f"E8-{i}", (f"@E8-{i}", f"@E8-{i}.pem"), N_E8) for i in range(6)),
    Case("E9-cert-hold", ("@E9", "@E9.pem"), N1, note="certificateHold needs live OCSP"),
    Case("E4-nonce-00", E4, "00" * 32, ours="nonce", nvidia="nonce"),
    Case("E6-other-gpu", E6, N1, ours="report signature", nvidia="fwid"),
    Case("E1-with-E3-chain", (E1[0], E3[1]), N1, ours="report signature", nvidia="fwid"),
    Case("E4-flipped-signature", ("@E4-flipped", E4[1]), N_E4, ours="report signature", nvidia="signature"),
    Case("chain-case2-root-only", (E1[0], "trustee/hopper_cert_chain_case2.txt"), N1, ours="certificate chain", nvidia="fwid"),
    Case("chain-case3-no-ica", (E1[0], "trustee/hopper_cert_chain_case3.txt"), N1, ours="certificate chain", nvidia="chain"),
    Case("chain-case4-no-leaf", (E1[0], "trustee/hopper_cert_chain_case4.txt"), N1, ours="FWID", nvidia="fwid"),
    # -- with RIMs, at a time inside their windows (README §4, §5) ------------------------------
    Case("E4+PROD-5E0001", E4, N_E4, T_2024, vbios_rim=PROD_5E0001),
    Case("E4+PROD-5E0001-expired", E4, N_E4, NOW, vbios_rim=PROD_5E0001, ours="certificate validity", nvidia="vbios_rim"),
    Case("E2-trimmed+PROD-74001A", E2_TRIMMED, N_E2, T_2024, vbios_rim=S + "1010_0200_882_960074001A_PROD.swidtag", ours="RIM measurements", nvidia="measurements", mismatches=vb(9)),
    Case("E3+PROD-740020", E3, N_E3, T_2024, vbios_rim=S + "1010_0205_862_9600740020_PROD.swidtag", ours="RIM measurements", nvidia="measurements", mismatches=vb(9)),
    Case("E5+PROD-5E0004", E5, N1, T_2024, vbios_rim=S + "1010_0205_862_96005E0004_PROD.swidtag", ours="RIM measurements", nvidia="measurements", mismatches=vb(9)),
    Case("E4+vbios-mismatch", E4, N_E4, T_2024, vbios_rim=SR + "NV_GPU_VBIOS_1010_0200_882_96005E0001_measurement_mismatch.xml", ours="RIM measurements", nvidia="measurements", mismatches=vb(9)),
    Case("E4+535-mismatch+vbios-mismatch", E4, N_E4, T_MISMATCH, driver_rim=SR + "NV_GPU_DRIVER_GH100_535.86.09_measurement_mismatch.xml", vbios_rim=SR + "NV_GPU_VBIOS_1010_0200_882_96005E0001_measurement_mismatch.xml", ours="RIM signature", nvidia="driver_rim", mismatches=vb(9) + drv(*E4_DRIVER_535)),
    Case("E1+test_no_gpu-RIMs", E1, N1, T_2024, driver_rim=S + "Driver_RIM_test_no_gpu.swidtag", vbios_rim=S + "1010_0200_882_96005E0001_test_no_gpu.swidtag", ours="RIM version", nvidia="driver_rim", mismatches=vb(1, 2, 3, 9, 11) + drv(*E1_DRIVER_TEST_NO_GPU)),
    Case("E1+550.144.03", E1, N1, T_2025, driver_rim=DRIVER_550, ours="RIM version", nvidia="driver_rim", mismatches=drv(7, 22, 31, 39, 40)),
    Case("E1+incorrect-signature-RIM", E1, N1, T_2025, driver_rim="nvat/testdata/incorrect_signature_driver_rim.xml", ours="RIM signature", nvidia="driver_rim", mismatches=drv(7, 22, 31, 39, 40)),
    Case("E1+550.144.03-wrong-RIM-root", E1, N1, T_2025, driver_rim=DRIVER_550, wrong_rim_root=True, ours="trust root", nvidia="driver_rim", mismatches=drv(7, 22, 31, 39, 40)),
    Case("E7+incorrect-cert-chain-RIM", E7, N1, datetime(2026, 1, 1, tzinfo=UTC), vbios_rim="nvat/testdata/incorrect_cert_chain_driver_rim.xml", arch="blackwell", ours="trust root", nvidia="vbios_rim", mismatches=vb(2, 3, 8, 18, 19), note="a GB100 VBIOS RIM (97.00.83.00.09) despite its name"),
    Case("E5+570.124.03-expired", E5, N1, NOW, driver_rim=SR + "NV_GPU_DRIVER_GH100_570.124.03_expired.xml", ours="certificate validity", nvidia="driver_rim", mismatches=drv(*E5_DRIVER_570), nvidia_only=drv(35)),
    Case("E5+570.124.03-in-window", E5, N1, datetime(2025, 1, 1, 12, tzinfo=UTC), driver_rim=SR + "NV_GPU_DRIVER_GH100_570.124.03_expired.xml", ours="RIM signature", nvidia="driver_rim", mismatches=drv(*E5_DRIVER_570), nvidia_only=drv(35)),
]  # fmt: skip
BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES)


def _hex(data: bytes) -> str:
    return data.hex() + "\n"


def _materialize(nv: Path, out: Path) -> None:
    """The derived inputs: E2 trimmed, E4 with one signature bit flipped, JSON evidence as files."""
    e2 = bytes.fromhex("".join((nv / E2[0]).read_text().split()))
    assert e2[-1] == 0
    (out / "@E2-trimmed").write_text(_hex(e2[:-1]))
    e4 = bytearray(bytes.fromhex("".join((nv / E4[0]).read_text().split())))
    e4[-1] ^= 1
    (out / "@E4-flipped").write_text(_hex(bytes(e4)))
    hopper = load_evidence_json((nv / JSON_EV / "multi_gpu_hopper.json").read_bytes())
    hopper += load_evidence_json((nv / "nvat/testdata/evidence_hopper_590_12.json").read_bytes())
    hopper += load_evidence_json((nv / JSON_EV / "hopper_evidence.json").read_bytes())
    hold = load_evidence_json((nv / JSON_EV / "hopper_evidence_cert_hold.json").read_bytes())
    for name, ev in [*((f"@E8-{i}", e) for i, e in enumerate(hopper)), ("@E9", hold[0])]:
        (out / name).write_text(_hex(ev.report))
        (out / f"{name}.pem").write_bytes(ev.chain_pem)


def _path(nv: Path, derived: Path, name: str) -> Path:
    return derived / name if name.startswith("@") else nv / name


@pytest.fixture(scope="module")
def nv() -> Path:
    root = vectors_dir()
    if root is None or not (root / "attestation" / "nvidia").is_dir():
        pytest.skip("NVIDIA vectors not found under SHIELDML_VECTORS/attestation/nvidia")
    return root / "attestation" / "nvidia"


@pytest.fixture(scope="module")
def derived(nv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nv-oracle")
    _materialize(nv, out)
    return out


def run_oracle(cases: list[dict[str, Any]], tmp: Path) -> list[dict[str, Any]]:
    if not ORACLE_PY.exists():
        pytest.skip(
            f"NVIDIA oracle venv not found ({ORACLE_VENV}): `make nv-oracle` installs "
            "nv-local-gpu-verifier 2.7.3 there (needs the package registry)"
        )
    batch = tmp / "batch.json"
    batch.write_text(json.dumps(cases))
    proc = subprocess.run(
        [str(ORACLE_PY), str(SCRIPT), "--batch", str(batch)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp,
        check=False,
    )
    if proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr:
        pytest.skip(f"NVIDIA oracle venv {ORACLE_VENV} is incomplete (`make clean nv-oracle`)")
    assert proc.returncode == 0, f"the oracle failed to run:\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def oracle(nv: Path, derived: Path) -> dict[str, dict[str, Any]]:
    """NVIDIA's result for every case, one oracle process for all of them."""
    batch = []
    for c in CASES:
        rep, chain = c.evidence
        item: dict[str, Any] = {
            "name": c.name,
            "report": str(_path(nv, derived, rep)),
            "chain": str(_path(nv, derived, chain)),
            "nonce": c.nonce,
            "time": c.now.isoformat(),
            "arch": c.arch,
        }
        for kind in ("driver_rim", "vbios_rim"):
            if getattr(c, kind):
                item[kind] = str(nv / getattr(c, kind))
        if c.wrong_rim_root:
            item["rim_root"] = str(nv / "nvat/testdata/incorrect_rim_root.crt")
        batch.append(item)
    shipped = {"report": str(nv / E2[0]), "chain": str(nv / E2[1]), "nonce": N_E2}
    batch.append({**batch[0], "name": "E2-as-shipped", **shipped})
    results = run_oracle(batch, derived)
    assert [r["case"] for r in results] == [b["name"] for b in batch]
    return {r["case"]: r for r in results}


def ours(nv: Path, derived: Path, c: Case) -> tuple[str | None, list[tuple[int, str]]]:
    """Our verdict: the refusing check (None: accepted) and the mismatching indices we find."""
    rep = bytes.fromhex("".join(_path(nv, derived, c.evidence[0]).read_text().split()))
    chain = load_chain(_path(nv, derived, c.evidence[1]).read_bytes())
    names = [r for r in (c.driver_rim, c.vbios_rim) if r]
    rims = [(nv / r).read_bytes() for r in names]
    trust = TrustAnchors()
    if c.wrong_rim_root:
        wrong = load_chain((nv / "nvat/testdata/incorrect_rim_root.crt").read_bytes())[0]
        trust = TrustAnchors(
            vendor={**trust.vendor, Vendor.NVIDIA_RIM: frozenset({fingerprint(wrong)})}
        )
    try:
        verify_gpu_evidence(
            rep, chain, now=c.now, trust=trust, nonce=bytes.fromhex(c.nonce), rims=rims
        )
    except MeasurementError as e:
        return e.check, sorted((m.index, m.rim.split()[0]) for m in getattr(e, "mismatches", ()))
    except AttestationError as e:
        refused: str | None = e.check
    else:
        refused = None
    if not rims:
        return refused, []
    # refused before the comparison (RIM version, signature, chain): our comparison on its own,
    # as verify_gpu_evidence runs it (index 35 skipped when the report says NVDEC0 is disabled)
    parsed = GpuReport.from_bytes(rep)
    skip = frozenset({NVDEC_INDEX}) if parsed.nvdec0_status == NVDEC_DISABLED else frozenset()
    found = compare(parsed.measurements(), [Rim.from_bytes(r) for r in rims], skip=skip)
    return refused, sorted((m.index, m.rim.split()[0]) for m in found)


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_ours_and_nvidias_verdicts_agree(
    nv: Path, derived: Path, oracle: dict[str, Any], name: str
):
    c = BY_NAME[name]
    theirs = oracle[name]
    assert theirs["supported"], theirs
    refused, found = ours(nv, derived, c)
    assert refused == c.ours, f"ours: {refused!r}, the README says {c.ours!r}"
    assert theirs["first_failure"] == c.nvidia, f"NVIDIA: {theirs['checks']}"
    assert (refused is None) == theirs["verdict"], (
        f"disagreement: ours {refused!r}, NVIDIA {theirs}"
    )
    their_mm = theirs["checks"].get("measurements", {}).get("mismatches")
    if c.mismatches or their_mm:
        want = sorted(c.mismatches + c.nvidia_only)
        assert [tuple(m) for m in their_mm] == want, "NVIDIA's mismatching indices"
        assert found == sorted(c.mismatches), "our mismatching indices"
    if theirs["checks"].get("measurements", {}).get("ok") is False:
        assert their_mm, "NVIDIA refused the measurements without naming an index"


def test_e2_as_shipped_is_the_one_known_disagreement(
    nv: Path, derived: Path, oracle: dict[str, Any]
):
    """README §4.1 E2: one 0x00 byte after the signature. Ours ignores that one zero byte (the
    signed range is the parsed message) and accepts; NVIDIA signs "blob minus 96 bytes" and
    refuses. Removed, both accept (case E2-trimmed)."""
    theirs = oracle["E2-as-shipped"]
    assert theirs["first_failure"] == "signature" and not theirs["verdict"]
    assert theirs["checks"]["signature"]["error"].startswith("SignatureVerificationError")
    c = Case("E2", E2, N_E2)
    assert ours(nv, derived, c) == (None, [])
    assert oracle["E2-trimmed"]["verdict"]


def test_oracle_clock_is_pinned(oracle: dict[str, Any]):
    """The same report and RIM: valid at 2024-06-01, expired at 2026-12-01 (not the wall clock)."""
    assert oracle["E4+PROD-5E0001"]["checks"]["vbios_rim"] == {
        "ok": True,
        "version_matched": True,
        "cert_status": "valid",
    }
    late = oracle["E4+PROD-5E0001-expired"]["checks"]["vbios_rim"]
    assert late["cert_status"] == "expired" and "cert chain verification failed" in late["error"]


def test_oracle_ocsp_is_pinned_and_asked_for_every_chain(oracle: dict[str, Any]):
    for name in ("E4+PROD-5E0001", "E1+test_no_gpu-RIMs"):
        asked = oracle[name]["ocsp"]["asked"]
        assert asked[0] == "GPU_ATTESTATION: 3 certificate(s)"  # between leaf and root
        assert oracle[name]["ocsp"]["pinned"] == "good"
    assert oracle["E1+test_no_gpu-RIMs"]["ocsp"]["asked"][1:] == [
        "DRIVER_RIM_CERT: 3 certificate(s)",
        "VBIOS_RIM_CERT: 3 certificate(s)",
    ]


def test_nvdec0_skip_is_ours_only(nv: Path, derived: Path, oracle: dict[str, Any]):
    """E5 has NVDEC0 disabled; NVIDIA's skip of index 35 never fires (see the module docstring)."""
    e5 = GpuReport.from_bytes(bytes.fromhex("".join((nv / E5[0]).read_text().split())))
    assert e5.nvdec0_status == NVDEC_DISABLED
    theirs = oracle["E5+570.124.03-in-window"]["checks"]["measurements"]["mismatches"]
    assert [35, "driver"] in theirs and len(theirs) == 16
    _, found = ours(nv, derived, BY_NAME["E5+570.124.03-in-window"])
    assert (35, "driver") not in found and len(found) == 15
