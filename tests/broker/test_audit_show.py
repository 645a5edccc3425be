"""``audit show``: every record names its key and digest, and the columns hold with long,
multi-line denial reasons (a broker's reason text is whatever the policy checks said)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from shieldml.cli.broker import audit_table

DIGEST = "sha256:" + "ab" * 32
RECORDS = [
    {"seq": 1, "at": "2026-12-01T10:00:00Z", "event": "key_added",
     "data": {"name": "model", "format": "stream"}},
    {"seq": 2, "at": "2026-12-01T10:00:01Z", "event": "policy_set",
     "data": {"name": "model", "profiles": 1, "sha256": "cd" * 32}},
    {"seq": 3, "at": "2026-12-01T10:00:02Z", "event": "release",
     "data": {"allowed": True, "keys": ["model", "data"], "workload_digest": DIGEST}},
    {"seq": 4, "at": "2026-12-01T10:00:03Z", "event": "release",
     "data": {"allowed": False, "keys": ["model"], "workload_digest": DIGEST,
              "reason": "policy denied",
              "reasons": ["key model: profile 1 (sgx): mrenclave: expected one of "
                          + "11" * 32 + ", found " + "22" * 32,
                          "key model: profile 1 (sgx): tcb_status: OutOfDate is not allowed"
                          " (insecure_allow_out_of_date)\nsecond line of the same reason"]}},
]  # fmt: skip


def _render(width: int) -> list[str]:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, legacy_windows=False).print(
        audit_table(RECORDS)
    )
    return buf.getvalue().rstrip("\n").splitlines()


@pytest.mark.parametrize("width", [80, 120, 200])
def test_columns_hold_with_a_long_multi_line_reason(width: int):
    lines = _render(width)
    assert all(len(line) <= width for line in lines)
    # every row line has its column separators at the same places as the header's
    header = next(line for line in lines if "reason" in line and "digest" in line)
    seps = [i for i, ch in enumerate(header) if ch in "│┃"]
    assert len(seps) == 8  # seven columns
    body = [line for line in lines if line.startswith("│")]
    assert len(body) > len(RECORDS) + 1  # the reason spread over several lines of its row
    for line in body:
        assert [i for i, ch in enumerate(line) if ch == "│"] == seps, line


def test_each_record_names_its_key_and_digest():
    text = "\n".join(_render(400))
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│")}
    assert "model, data" in rows["3"] and "abababababab…" in rows["3"]
    assert "cdcdcdcdcdcd…" in rows["2"] and "model" in rows["2"]
    assert "denied" in rows["4"] and "policy denied" in rows["4"]
    # the whole reason is there, nothing cut: the 64-hex values survive folding
    flat = "".join(line.split("│")[7].strip() for line in text.splitlines() if line.startswith("│"))
    assert "22" * 32 in flat and "second line of the same reason" in text
