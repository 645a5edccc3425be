"""``shieldml rebind``: a protected file re-encrypted for another bound path, all or nothing;
files written by Gramine's own pf-crypt, read back by it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from shieldml.cli import main
from shieldml.errors import IntegrityError
from shieldml.files import Format, encrypt_file, generate_key, inspect_file, open_protected
from tests.conftest import pf_crypt_tool

PLAIN = bytes(range(256)) * 40 + b"REBIND-MARKER"  # 10253 bytes: inline data + 2 data nodes


def pf(version: str, *args: str, cwd: Path) -> None:
    subprocess.run([str(pf_crypt_tool(version)), *args], cwd=cwd, check=True, capture_output=True)


def rebind(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = main(["rebind", *args])
    return rc, capsys.readouterr().out


@pytest.mark.parametrize(("version", "fmt_version"), [("v1.8", 1), ("v1.9", 2)])
def test_pf_crypt_file_rebound_in_place_opens_at_the_new_path_in_gramine_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], version: str, fmt_version: int
):
    (tmp_path / "plain").write_bytes(PLAIN)
    pf(version, "gen-key", "-w", "wrap", cwd=tmp_path)
    pf(version, "encrypt", "-w", "wrap", "-i", "plain", "-o", "model.pt", cwd=tmp_path)
    wrap = (tmp_path / "wrap").read_bytes()
    assert inspect_file(tmp_path / "model.pt", wrap).bound_path == "model.pt"
    rc, out = rebind(
        capsys, str(tmp_path / "model.pt"), "--key", str(tmp_path / "wrap"),
        "--bind", "model.pt", "--to", "/srv/app/model.pt", "--json",
    )  # fmt: skip
    assert rc == 0
    doc = json.loads(out)
    assert doc["action"] == "rebound" and doc["files"][0]["bound_path"] == "/srv/app/model.pt"
    info = inspect_file(tmp_path / "model.pt", wrap)
    assert (info.bound_path, info.version) == ("/srv/app/model.pt", fmt_version)
    with pytest.raises(IntegrityError, match="bound to path"):
        open_protected(tmp_path / "model.pt", wrap, bind="model.pt")
    # Gramine's own tool reads it, and finds the new stored path
    pf(version, "decrypt", "-w", "wrap", "-i", "model.pt", "-o", "back", cwd=tmp_path)
    assert (tmp_path / "back").read_bytes() == PLAIN
    assert sorted(os.listdir(tmp_path)) == ["back", "model.pt", "plain", "wrap"]  # no leftovers


def test_rebind_to_a_new_file_under_a_new_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    old, new = generate_key(), generate_key()
    (tmp_path / "k1").write_bytes(old)
    (tmp_path / "k2").write_bytes(new)
    (tmp_path / "p").write_bytes(PLAIN)
    encrypt_file(tmp_path / "p", tmp_path / "c", old, bind="enc/c")
    rc, _ = rebind(
        capsys, str(tmp_path / "c"), str(tmp_path / "d"), "--key", str(tmp_path / "k1"),
        "--new-key", str(tmp_path / "k2"), "--bind", "enc/c", "--to", "/workload/c",
    )  # fmt: skip
    assert rc == 0
    with open_protected(tmp_path / "d", new, bind="/workload/c") as f:
        assert f.read() == PLAIN
    with open_protected(tmp_path / "c", old, bind="enc/c") as f:  # the source is untouched
        assert f.read() == PLAIN
    assert main(["rebind", str(tmp_path / "c"), str(tmp_path / "d"), "--key", str(tmp_path / "k1"),
                 "--bind", "enc/c", "--to", "x"]) == 1  # fmt: skip
    assert "already exists" in capsys.readouterr().err


def test_rebind_of_a_tree_with_one_tampered_file_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """All or nothing: a tree whose last file fails authentication is left exactly as it was
    (in place), and no output appears (to OUT); no temporary file is left."""
    key = generate_key(Format.GRAMINE_PF)
    (tmp_path / "k").write_bytes(key)
    tree = tmp_path / "enc"
    (tmp_path / "p").write_bytes(PLAIN)
    for name in ("a", "b"):
        encrypt_file(tmp_path / "p", tree / name, key, fmt=Format.GRAMINE_PF, bind=f"data/{name}")
    raw = bytearray((tree / "b").read_bytes())
    raw[4096 + 100] ^= 1  # a data node of the last file
    (tree / "b").write_bytes(bytes(raw))
    before = {p.name: p.read_bytes() for p in tree.iterdir()}
    for out in ([], [str(tmp_path / "out")]):
        args = [str(tree), *out, "--key", str(tmp_path / "k"), "--bind", "data", "--to", "/w/data"]
        assert main(["rebind", *args]) == 3  # an integrity error
        assert "failed authentication" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in tree.iterdir()} == before
        assert not (tmp_path / "out").exists()


def test_rebind_refuses_a_file_not_bound_where_it_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    key = generate_key(Format.GRAMINE_PF)
    (tmp_path / "k").write_bytes(key)
    (tmp_path / "p").write_bytes(PLAIN)
    encrypt_file(tmp_path / "p", tmp_path / "c", key, fmt=Format.GRAMINE_PF, bind="input.pt")
    before = (tmp_path / "c").read_bytes()
    args = [str(tmp_path / "c"), "--key", str(tmp_path / "k"), "--bind", "model.pt", "--to", "/m"]
    assert main(["rebind", *args]) == 3
    assert "bound to path 'input.pt', not 'model.pt'" in capsys.readouterr().err
    assert (tmp_path / "c").read_bytes() == before
    assert main(["rebind", str(tmp_path / "c"), "--key", str(tmp_path / "k"), "--to", "/"]) == 2
