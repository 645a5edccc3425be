"""What the files API raises for inputs it cannot read: InputReadError, never a format or
integrity verdict on bytes it did not see."""

from __future__ import annotations

from pathlib import Path

import pytest

from shieldml.errors import FormatError, InputReadError, IntegrityError, OutputExistsError
from shieldml.files import (
    decrypt_file,
    decrypt_path,
    detect_format,
    encrypt_file,
    encrypt_path,
    generate_key,
    open_protected,
)


def _not_a_verdict(e: pytest.ExceptionInfo[InputReadError]) -> None:
    assert not isinstance(e.value, FormatError | IntegrityError)


def test_a_missing_input_is_an_input_read_error(tmp_path: Path):
    key, missing = generate_key(), tmp_path / "missing"
    for call in (
        lambda: detect_format(missing),
        lambda: open_protected(missing, key),
        lambda: encrypt_file(missing, tmp_path / "out.enc", key),
        lambda: decrypt_file(missing, tmp_path / "out", key),
    ):
        with pytest.raises(InputReadError, match=rf"{missing}: cannot read: No such file") as e:
            call()
        _not_a_verdict(e)
    with pytest.raises(InputReadError, match=rf"{missing}: no such file or directory") as e:
        encrypt_path(missing, tmp_path / "enc", key)
    _not_a_verdict(e)
    assert not (tmp_path / "out.enc").exists() and not (tmp_path / "out").exists()


def test_a_directory_given_as_a_file_is_an_input_read_error(tmp_path: Path):
    with pytest.raises(InputReadError, match="cannot read: Is a directory"):
        detect_format(tmp_path)


def test_a_tree_onto_a_file_is_output_exists(tmp_path: Path):
    key = generate_key()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a").write_bytes(b"A")
    encrypt_path(tmp_path / "plain", tmp_path / "enc", key)
    (tmp_path / "file").write_bytes(b"keep")
    with pytest.raises(OutputExistsError, match="exists and is not a directory"):
        decrypt_path(tmp_path / "enc", tmp_path / "file", key)
    assert (tmp_path / "file").read_bytes() == b"keep"
