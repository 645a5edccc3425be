"""Memory stays bounded: encrypting and decrypting a 2 GiB file peaks below 150 MB RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SIZE = 2 << 30
LIMIT = 150 * 1000 * 1000

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from shieldml.files import Format, decrypt_file, encrypt_file, generate_key
    fmt, d = Format(sys.argv[1]), sys.argv[2]
    plain, enc, out = f"{d}/plain", f"{d}/enc", f"{d}/out"
    with open(plain, "wb") as f:
        f.truncate(int(sys.argv[3]))
    key = generate_key(fmt)
    encrypt_file(plain, enc, key, fmt=fmt, bind="/p")
    os.unlink(plain)
    decrypt_file(enc, out, key, bind="/p")
    ok = os.path.getsize(out) == int(sys.argv[3])
    # VmHWM is this process image's own peak; ru_maxrss would include the parent's RSS at fork
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    print(json.dumps({"maxrss": peak, "ok": ok}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["stream", "gramine-pf"])
def test_two_gib_roundtrip_peaks_below_150_mb(tmp_path: Path, fmt: str):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, fmt, str(tmp_path), str(SIZE)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    result = json.loads(proc.stdout)
    assert result["ok"]
    assert result["maxrss"] < LIMIT, f"peak RSS {result['maxrss'] / 1e6:.1f} MB"
