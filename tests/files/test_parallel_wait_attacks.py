"""Attacks on ``_parallel_decrypt`` waiting on its workers' sentinels (aa178cb): a worker that
dies, one that fails, one that never ends while the user presses Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import shieldml.files._api as api
from shieldml.errors import IntegrityError
from shieldml.files import Format, decrypt_file, encrypt_file, generate_key

SIZE = (20 << 20) + 4321  # three 8 MiB chunks: two workers


def _encrypted(tmp_path: Path, fmt: Format) -> tuple[bytes, bytes]:
    key = generate_key(fmt)
    data = os.urandom(SIZE)
    (tmp_path / "p").write_bytes(data)
    encrypt_file(tmp_path / "p", tmp_path / "c", key, fmt=fmt, bind="f")
    return key, data


@pytest.mark.parametrize("fmt", [Format.STREAM, Format.GRAMINE_PF])
def test_a_worker_killed_by_the_host_is_noticed_and_the_parent_verifies_the_whole_file(
    tmp_path: Path, fmt: Format, monkeypatch: pytest.MonkeyPatch
):
    """SIGKILL of one worker (the OOM killer, the host): its sentinel fires, its exit code is
    -9, and the parent decrypts and verifies every byte itself instead of trusting a part that
    was never written."""
    key, data = _encrypted(tmp_path, fmt)
    real = api._worker

    def worker(src, key_, bind, out, start, end, counter, failed_errno):  # type: ignore[no-untyped-def]
        if start > 0:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, key_, bind, out, start, end, counter, failed_errno)

    monkeypatch.setattr(api, "_worker", worker)
    decrypt_file(tmp_path / "c", tmp_path / "d", key, bind="f", workers=2)
    assert (tmp_path / "d").read_bytes() == data


def test_a_worker_failing_at_once_beside_a_slow_one_still_fails_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """One worker ends early with an error while the other is still decrypting (a flipped byte
    in the first range): the wait sees the first end, keeps waiting for the second, and the
    file is refused with nothing left at the destination."""
    key, _data = _encrypted(tmp_path, Format.STREAM)
    with (tmp_path / "c").open("r+b") as f:
        f.seek(1 << 20)
        f.write(b"\xff")
    real = api._worker

    def worker(src, key_, bind, out, start, end, counter, failed_errno):  # type: ignore[no-untyped-def]
        if start > 0:
            time.sleep(0.3)  # the second range ends well after the first one failed
        real(src, key_, bind, out, start, end, counter, failed_errno)

    monkeypatch.setattr(api, "_worker", worker)
    with pytest.raises(IntegrityError):
        decrypt_file(tmp_path / "c", tmp_path / "d", key, bind="f", workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "p"]


_CTRL_C = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the suite runs with it ignored
    import shieldml.files._api as api
    from shieldml.files import Format, decrypt_file, encrypt_file, generate_key

    tmp = sys.argv[1]
    key = generate_key(Format.STREAM)
    with open(os.path.join(tmp, "p"), "wb") as f:
        f.write(os.urandom((20 << 20) + 1))
    encrypt_file(os.path.join(tmp, "p"), os.path.join(tmp, "c"), key, bind="f")
    def hang(*_a):
        time.sleep(60)  # a worker that never ends (the host stopped its disk)

    api._worker = hang
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    try:
        decrypt_file(os.path.join(tmp, "c"), os.path.join(tmp, "d"), key, bind="f", workers=2)
    except KeyboardInterrupt:
        print("interrupted", round(time.monotonic() - t0, 1))
    import multiprocessing
    print("children", len(multiprocessing.active_children()))
    print("left", sorted(n for n in os.listdir(tmp) if n not in ("c", "p")))
    """
)


def test_ctrl_c_while_waiting_on_workers_that_never_end_stops_them_and_leaves_no_output(
    tmp_path: Path,
):
    """The sentinel wait is interruptible: Ctrl-C raises KeyboardInterrupt out of it at once,
    every worker is terminated and joined, and no partial output is left."""
    out = subprocess.run(
        [sys.executable, "-c", _CTRL_C, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split("\n")
    interrupted = out[0].split()
    assert interrupted[0] == "interrupted" and float(interrupted[1]) < 5, out
    assert out[1:3] == ["children 0", "left []"], out
