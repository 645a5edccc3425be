"""Issue 12, point 5c: what AES-GCM authenticates is what it decrypts.

AES-GCM implementations may read their input twice (GHASH over the ciphertext, then the
counter-mode pass; OpenSSL's generic path and its tail handling do). If that input were a shared
mapping of the host's file, the host could rewrite the bytes between the two reads: the tag would
vouch for one ciphertext while another was decrypted. Each test lets the host rewrite the file
right after every decryption call and checks that the bytes handed to AES-GCM did not change with
it, which is only true when they were copied into private memory first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from shieldml.files import Format, _gramine, encrypt_file, generate_key, open_protected

DATA = os.urandom(3 << 20) + b"tail"


def _host_rewrites(path: Path, ct: Any) -> None:
    """The host overwrites the whole file with other bytes, checks whether ``ct`` followed, and
    puts the file back (so that later reads still authenticate)."""
    before = bytes(ct)
    original = path.read_bytes()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(b ^ 0xFF for b in original), 0)
        changed = bytes(ct) != before
        os.pwrite(fd, original, 0)
    finally:
        os.close(fd)
    assert not changed, "AES-GCM was handed a shared view of the host's file"


def test_host_rewriting_a_stream_file_during_decryption_cannot_change_the_bytes_decrypted(
    tmp_path: Path,
):
    key = generate_key(Format.STREAM)
    enc = tmp_path / "model.enc"
    (tmp_path / "model").write_bytes(DATA)
    encrypt_file(tmp_path / "model", enc, key, bind="/m")
    calls = 0
    with open_protected(enc, key, bind="/m") as f:
        real = f._aead  # type: ignore[attr-defined]

        class HostBetweenReads:
            def decrypt_into(self, nonce: bytes, ct: Any, aad: Any, out: Any) -> None:
                nonlocal calls
                real.decrypt_into(nonce, ct, aad, out)
                calls += 1
                _host_rewrites(enc, ct)

        f._aead = HostBetweenReads()  # type: ignore[attr-defined]
        assert f.read(1 << 20) == DATA[: 1 << 20]
    assert calls == 2  # the first segment is shorter: two segments


@pytest.mark.skipif(_gramine._native is None, reason="the gramine-pf C helper is not built here")
def test_host_rewriting_a_gramine_file_during_decryption_cannot_change_the_bytes_decrypted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    key = generate_key(Format.GRAMINE_PF)
    enc = tmp_path / "model.enc"
    (tmp_path / "model").write_bytes(DATA)
    encrypt_file(tmp_path / "model", enc, key, bind="/m", fmt=Format.GRAMINE_PF)
    native = _gramine._native
    calls = 0

    class HostBetweenReads:
        @staticmethod
        def decrypt_nodes(mht: bytes, slot: int, ct: Any, out: Any, n: int) -> int:
            nonlocal calls
            bad = int(native.decrypt_nodes(mht, slot, ct, out, n))
            calls += 1
            _host_rewrites(enc, ct)
            return bad

    monkeypatch.setattr(_gramine, "_native", HostBetweenReads)
    with open_protected(enc, key, bind="/m") as f:
        assert f.read(256 << 10) == DATA[: 256 << 10]
    assert calls >= 1
