"""Which update the TCB check advises, from the kinds of the components that are behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from shieldml.attest import IntelCollateral
from shieldml.attest._intel_collateral import PckExtension, TcbInfo, TcbLevel
from shieldml.attest._intel_verify import _behind, _text, _update_hint

BIOS = "a BIOS (firmware/microcode) update"
OS_VMM = "an OS/VMM update (late microcode, SEAMLDR, PCE)"
TDX = "a TDX module update"
SGX_NAMES = ("BIOS Early Microcode Update", "OS/VMM SGX Late Microcode Update", "OS/VMM TXT SINIT",
             *(f"component {i + 1}" for i in range(3, 16)))  # fmt: skip
SGX_CATS = ("BIOS", "OS/VMM", "OS/VMM", *([""] * 13))
TDX_NAMES = ("OS/VMM TDX Module", "OS/VMM TDX Module", "OS/VMM TDX Late Microcode Update",
             *(f"component {i + 1}" for i in range(3, 16)))  # fmt: skip
TDX_CATS = ("OS/VMM", "OS/VMM", "OS/VMM", *([""] * 13))
NEWEST = [2] * 16


def _level(*, tdx: bool = False, named: bool = True) -> TcbLevel:
    return TcbLevel(
        sgx_components=tuple(NEWEST),
        pcesvn=13,
        tdx_components=(3,) * 16 if tdx else None,
        date="2025-01-01",
        status="UpToDate",
        advisory_ids=(),
        sgx_names=SGX_NAMES if named else (),
        tdx_names=TDX_NAMES if named and tdx else (),
        sgx_categories=SGX_CATS if named else (),
        tdx_categories=TDX_CATS if named and tdx else (),
    )


def _platform(behind: dict[int, int], pcesvn: int = 13) -> PckExtension:
    svn = tuple(behind.get(i, 2) for i in range(16))
    return PckExtension(b"", svn, pcesvn, b"", b"", b"", 0)


@pytest.mark.parametrize(
    ("level", "ext", "tdx_svn", "text", "hint"),
    [
        (_level(), _platform({0: 1}), None, "SGX BIOS Early Microcode Update (#1): 1 < 2", BIOS),
        (_level(), _platform({2: 1}), None, "SGX OS/VMM TXT SINIT (#3): 1 < 2", OS_VMM),
        (_level(), _platform({}, pcesvn=12), None, "PCESVN 12 < 13", OS_VMM),
        (_level(named=False), _platform({5: 1}), None, "SGX component 6 (#6): 1 < 2",
         "a platform update"),
        (_level(tdx=True), _platform({0: 1}), bytes([3, 0, 2, *[3] * 13]),
         "SGX BIOS Early Microcode Update (#1): 1 < 2; "
         "TDX OS/VMM TDX Module (TEE_TCB_SVN[1]): 0 < 3; "
         "TDX OS/VMM TDX Late Microcode Update (TEE_TCB_SVN[2]): 2 < 3",
         f"{BIOS} and {OS_VMM} and {TDX}"),
        (_level(tdx=True), _platform({}), bytes([3] * 5 + [1] + [3] * 10),
         "TDX component 6 (TEE_TCB_SVN[5]): 1 < 3", TDX),
        (_level(), _platform({}), None, "no component behind", "a platform update"),
    ],
)  # fmt: skip
def test_the_advice_follows_the_kinds_behind(
    level: TcbLevel, ext: PckExtension, tdx_svn: bytes | None, text: str, hint: str
):
    lags = _behind(level, ext, tdx_svn)
    assert _text(lags) == text
    assert _update_hint(lags) == f"{hint} is needed"


def test_the_categories_come_from_intels_tcb_info(att: Path):
    raw = (att / "intel" / "phala" / "tdx_quote_v4_collateral.json").read_bytes()
    newest = TcbInfo.from_json(IntelCollateral.from_json(raw).tcb_info).levels[0]
    assert newest.sgx_categories[:3] == ("BIOS", "OS/VMM", "OS/VMM")
    assert newest.tdx_categories[0] == "OS/VMM" and newest.tdx_names[0] == "OS/VMM TDX Module"
    svn = dict(enumerate(newest.sgx_components))
    behind_on_bios = _platform({**svn, 0: newest.sgx_components[0] - 1}, newest.pcesvn)
    lags = _behind(newest, behind_on_bios, None)
    assert [lag.kinds for lag in lags] == [frozenset({"BIOS"})]
    assert _update_hint(lags) == f"{BIOS} is needed"
