"""Run a command with the wall clock shifted (libfaketime), so tests cannot depend on today's date.

    python scripts/clock_shift.py --shift +730d -- pytest tests/attest ...
    python scripts/clock_shift.py -- pytest ...        # keep the shift of an outer `faketime`

Only the wall clock moves (``FAKETIME_DONT_FAKE_MONOTONIC=1``): timeouts, deadlines and sleeps run in
real time, so a test that waits 0.5 s still waits 0.5 s, two years on.

Which libfaketime: Debian's 0.9.10 (``apt-get install faketime``) breaks Python >= 3.11 either way
it is configured. With the monotonic clock faked, every timed wait on a lock (``Event.wait``,
``queue.get(timeout=...)``, ``threading.Timer``) hangs, since glibc's ``sem_clockwait`` is not
intercepted; with it left alone, ``time.sleep`` fails with EINVAL (``clock_nanosleep`` with an
absolute monotonic deadline is shifted as if it were wall time). The build that the PyPI package
``libfaketime`` ships (a dev dependency) has neither fault. So each candidate is probed first: a
child process must see the shifted date, sleep and time out a wait, all within seconds. The first
that passes is used; when none does, a ``--shift`` run is skipped and says so (exit 0). A command
given with no ``--shift`` and no outer ``faketime`` runs as it is.

Under an outer ``faketime '+730 days' make test`` the probe of the inherited library fails for the
reason above; the command then runs with a working library and the same ``FAKETIME`` value (and
fails, exit 2, when there is none: the shift was asked for).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

DEBIAN = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
_SHIFT = re.compile(r"^[+-]\d+(\.\d+)?[smhdy]?$")

# The child prints the shifted wall time, then proves that sleeping and timed waits return.
_PROBE = """
import queue, threading, time
t0 = time.monotonic()
time.sleep(0.05)
threading.Event().wait(0.05)
try:
    queue.Queue().get(timeout=0.05)
except queue.Empty:
    pass
print(time.time(), time.monotonic() - t0)
"""


def candidates() -> list[Path]:
    """Where a libfaketime may be: the PyPI package's build first, then Debian's."""
    out: list[Path] = []
    spec = importlib.util.find_spec("libfaketime")
    if spec is not None and spec.origin:
        vendored = Path(spec.origin).parent / "vendor" / "libfaketime" / "src" / "libfaketime.so.1"
        if vendored.exists():
            out.append(vendored)
    if DEBIAN.exists():
        out.append(DEBIAN)
    return out


def shifted_env(lib: Path, shift: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKETIME")}
    env["LD_PRELOAD"] = str(lib)
    env["FAKETIME"] = shift
    env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
    return env


def seconds(shift: str) -> float:
    """``+730d`` / ``-30d`` / ``+63072000`` (libfaketime's relative syntax) as seconds."""
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "y": 365 * 86400}
    if shift[-1] in unit:
        return float(shift[:-1]) * unit[shift[-1]]
    return float(shift)


def real_time() -> float:
    """The unshifted wall clock, read by a child without libfaketime (this process may have it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKETIME")}
    env.pop("LD_PRELOAD", None)
    out = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return float(out.stdout)


def probe(lib: Path, shift: str) -> str | None:
    """None when ``lib`` shifts the clock by ``shift`` and timed waits still work, else why not."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE],
            env=shifted_env(lib, shift),
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"{lib}: a timed wait never returned (libfaketime does not intercept sem_clockwait)"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{lib}: the probe failed ({last})"
    wall, _elapsed = (float(x) for x in out.stdout.split())
    off = wall - real_time()
    want = seconds(shift)
    if abs(off - want) > 60:
        return f"{lib}: the clock moved {off:+.0f} s, not {want:+.0f} s"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shift", help="libfaketime offset: +730d, -30d, +2y, +3600 ...")
    ap.add_argument("--what", default="the command", help="what is run, for the messages")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("no command given")
    outer = os.environ.get("FAKETIME") if "faketime" in os.environ.get("LD_PRELOAD", "") else None
    shift = args.shift or outer
    if shift is None:
        return subprocess.call(cmd)
    if not _SHIFT.match(shift):
        ap.error(f"--shift {shift!r}: give a relative offset such as +730d or -30d")
    problems = []
    for lib in candidates():
        why = probe(lib, shift)
        if why is None:
            print(
                f"clock shift {shift} for {args.what}: libfaketime {lib}",
                file=sys.stderr,
                flush=True,
            )
            return subprocess.call(cmd, env=shifted_env(lib, shift))
        problems.append(why)
    reason = "; ".join(problems) or "no libfaketime found (pip install libfaketime, or faketime)"
    if args.shift:
        print(f"SKIPPED clock shift {shift} for {args.what}: {reason}", file=sys.stderr, flush=True)
        return 0
    print(f"error: clock shift {shift} (from an outer faketime): {reason}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
