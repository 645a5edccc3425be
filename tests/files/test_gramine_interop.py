"""gramine-pf against Gramine's own ``pf-crypt`` (v1.8 writes v1, v1.9 writes v2 and reads both).

Gramine decrypts what shieldml writes (both versions, the C helper's threaded writer and the
Python writer, sizes at the inline/node/MHT-node/two-level-tree boundaries) and shieldml decrypts
what Gramine writes. The binaries come from ``SHIELDML_GRAMINE_PF`` (default
``../shared/tools/gramine-pf``); the tests skip with the reason where they are absent.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from shieldml.files import Format, encrypt_file, generate_key, open_protected
from shieldml.files import _gramine as g
from tests.conftest import REPO

MD, NODE, RUN = g.MD_USER_DATA_SIZE, g.NODE_SIZE, g.NODE_SIZE * g.DATA_SLOTS
# inline only, the first data node, a full and an overfull MHT node, the root MHT node's 32
# children full and the first node of the second level
SIZES = [0, 1, MD, MD + 1, MD + NODE, MD + RUN, MD + RUN + 1, MD + RUN * 33, MD + RUN * 33 + 1]
# (tool, format version written by shieldml / by the tool); 1.8 reads and writes v1 only
READS = [("v1.8", 1), ("v1.9", 1), ("v1.9", 2)]
WRITES = [("v1.8", 1), ("v1.9", 2)]


def _tools() -> Path:
    env = os.environ.get("SHIELDML_GRAMINE_PF")
    return Path(env) if env else REPO.parent / "shared" / "tools" / "gramine-pf"


def _pf_crypt(tag: str) -> Path:
    tool = _tools() / tag / "pf-crypt"
    if not os.access(tool, os.X_OK):
        pytest.skip(f"Gramine's pf-crypt {tag} not found at {tool} (set SHIELDML_GRAMINE_PF)")
    return tool


def _run(tool: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def _plain(size: int) -> bytes:
    return (bytes(range(251)) * (size // 251 + 1))[:size]  # not zeros: a skipped node shows


@pytest.fixture
def wrap_key(tmp_path: Path) -> Path:
    path = tmp_path / "wrap-key"
    path.write_bytes(generate_key(Format.GRAMINE_PF))
    return path


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("tag", "version"), READS)
@pytest.mark.parametrize("writer", ["native", "python"])
def test_gramine_reads_what_shieldml_writes(
    tmp_path: Path,
    wrap_key: Path,
    tag: str,
    version: int,
    size: int,
    writer: str,
    monkeypatch: pytest.MonkeyPatch,
):
    tool = _pf_crypt(tag)
    if writer == "native" and not g.native_accelerator():
        pytest.skip("the gramine-pf C helper is not built here")
    if writer == "python":
        if size > MD + RUN + 1:
            pytest.skip("the Python writer is the reference (vectors); large sizes: native only")
        monkeypatch.setattr(g, "_native", None)
    elif size > MD + RUN:  # several runs per write: the threaded path
        monkeypatch.setattr(g, "_encrypt_threads", lambda: 3)
    (tmp_path / "in").write_bytes(_plain(size))
    enc = tmp_path / "file.pf"
    encrypt_file(
        tmp_path / "in", enc, wrap_key.read_bytes(), fmt=Format.GRAMINE_PF, gramine_version=version
    )
    done = _run(tool, "decrypt", "-w", wrap_key, "-i", enc, "-o", tmp_path / "out", "-V")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "out").read_bytes() == _plain(size)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("tag", "version"), WRITES)
def test_shieldml_reads_what_gramine_writes(
    tmp_path: Path, wrap_key: Path, tag: str, version: int, size: int
):
    tool = _pf_crypt(tag)
    (tmp_path / "in").write_bytes(_plain(size))
    enc = tmp_path / "file.pf"
    done = _run(tool, "encrypt", "-w", wrap_key, "-i", tmp_path / "in", "-o", enc)
    assert done.returncode == 0, done.stdout + done.stderr
    assert enc.stat().st_size == g.ciphertext_size(size)  # our writer's size for the same input
    with open_protected(enc, wrap_key.read_bytes()) as f:  # stored path: -o as given
        assert f.header.major_version == version
        assert f.read() == _plain(size)


def test_gramine_refuses_a_shieldml_file_modified_in_one_data_node(tmp_path: Path, wrap_key: Path):
    """The other direction of authentication: Gramine itself rejects a flipped ciphertext byte
    in a node our (native, threaded) writer produced, so the tags it checks are real."""
    tool = _pf_crypt("v1.9")
    size = MD + RUN * 3
    (tmp_path / "in").write_bytes(_plain(size))
    enc = tmp_path / "file.pf"
    encrypt_file(tmp_path / "in", enc, wrap_key.read_bytes(), fmt=Format.GRAMINE_PF)
    with enc.open("r+b") as f:
        f.seek(g._phys_data(150) * NODE + 17)  # a data node of the second MHT node
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    done = _run(tool, "decrypt", "-w", wrap_key, "-i", enc, "-o", tmp_path / "out")
    assert done.returncode != 0


def test_gramine_1_8_refuses_version_2(tmp_path: Path, wrap_key: Path):
    """What shieldml writes as v2 really is v2: Gramine 1.8 does not read it."""
    tool = _pf_crypt("v1.8")
    (tmp_path / "in").write_bytes(_plain(5000))
    enc = tmp_path / "file.pf"
    key = wrap_key.read_bytes()
    encrypt_file(tmp_path / "in", enc, key, fmt=Format.GRAMINE_PF, gramine_version=2)
    done = _run(tool, "decrypt", "-w", wrap_key, "-i", enc, "-o", tmp_path / "out")
    assert done.returncode != 0
