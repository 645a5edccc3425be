"""gramine-pf: Gramine's own files decrypt byte-exactly, tampering is refused, our files match."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shieldml.errors import FormatError, IntegrityError, UnsupportedVersionError
from shieldml.files import Format, encrypt_file, generate_key, gramine_norm_path, open_protected
from shieldml.files import _gramine as g
from tests.conftest import vector_plaintext

SIZES_V1 = [0, 1, 3071, 3072, 3073, 7168, 7169, 100000, 396288, 396289, 1048577, 12979205]
SIZES_V2 = [s for s in SIZES_V1 if s != 12979205]

NEGATIVE = {
    "meta_mac_flipped.pf": IntegrityError,
    "kdf_nonce_flipped.pf": IntegrityError,
    "root_mht_flipped.pf": IntegrityError,
    "data_node_flipped.pf": IntegrityError,
    "data_nodes_swapped.pf": IntegrityError,
    "magic_flipped.pf": FormatError,
    "version_9.pf": UnsupportedVersionError,
    "truncated_last_node.pf": IntegrityError,
    "truncated_odd.pf": IntegrityError,
    "empty.pf": FormatError,
}


@pytest.fixture(params=["native", "python"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the C helper for runs of data nodes, and again with the Python reference."""
    if request.param == "native" and not g.native_accelerator():
        pytest.skip("the gramine-pf C helper is not built here (no compiler or OpenSSL headers)")
    if request.param == "python":
        monkeypatch.setattr(g, "_native", None)
    return str(request.param)


@pytest.fixture(scope="module")
def pf(vectors: Path) -> Path:
    return vectors / "gramine-pf"


@pytest.fixture(scope="module")
def wrap_key(pf: Path) -> bytes:
    return (pf / "wrap-key").read_bytes()


@pytest.mark.parametrize(
    ("version", "size"), [("v1", s) for s in SIZES_V1] + [("v2", s) for s in SIZES_V2]
)
def test_gramine_vectors_decrypt_byte_exactly(
    pf: Path, wrap_key: bytes, version: str, size: int, reader: str
):
    path = pf / version / f"size_{size}.pf"
    with open_protected(path, wrap_key, bind=f"{version}/size_{size}.pf") as f:
        assert f.format is Format.GRAMINE_PF
        assert f.header.major_version == int(version[1])
        assert f.size == size
        assert f.read() == vector_plaintext(size)
    # our writer produces exactly the size Gramine's tool produced
    assert g.node_count(size) * g.NODE_SIZE == path.stat().st_size


@pytest.mark.parametrize(("name", "error"), sorted(NEGATIVE.items()))
def test_negative_vectors_are_refused(
    pf: Path, wrap_key: bytes, name: str, error: type, reader: str
):
    with pytest.raises(error):
        with open_protected(pf / "negative" / name, wrap_key, bind="v1/size_100000.pf") as f:
            f.read()


def test_renamed_file_opens_only_at_its_stored_path(pf: Path, wrap_key: bytes):
    path = pf / "negative" / "renamed_valid.pf"
    with pytest.raises(IntegrityError, match=r"bound to path 'v1/size_3073\.pf'"):
        open_protected(path, wrap_key, bind="negative/renamed_valid.pf")
    with open_protected(path, wrap_key, bind="v1/size_3073.pf") as f:
        assert f.read() == vector_plaintext(3073)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_wrong_key_is_refused(pf: Path, version: str):
    with pytest.raises(IntegrityError, match="metadata node"):
        open_protected(pf / version / "size_100000.pf", bytes(16), bind=f"{version}/size_100000.pf")


def test_random_access_on_two_level_tree(pf: Path, wrap_key: bytes, reader: str):
    plain = vector_plaintext(12979205)
    with open_protected(pf / "v1/size_12979205.pf", wrap_key, bind="v1/size_12979205.pf") as f:
        for pos, n in [(12979205 - 10, 50), (3000, 200), (3072 + 96 * 4096 * 33 - 7, 9000), (0, 1)]:
            f.seek(pos)
            assert f.read(n) == plain[pos : pos + n]


@pytest.mark.parametrize("size", SIZES_V1)
def test_written_size_equals_gramine_tool_output(pf: Path, tmp_path: Path, size: int):
    (tmp_path / "in").write_bytes(vector_plaintext(size))
    encrypt_file(
        tmp_path / "in", tmp_path / "o", generate_key(Format.GRAMINE_PF), fmt=Format.GRAMINE_PF
    )
    assert (tmp_path / "o").stat().st_size == (pf / "v1" / f"size_{size}.pf").stat().st_size


def test_kdf_vector_from_spec():
    wrap = bytes.fromhex("ffeeddccbbaa99887766554433221100")
    assert g.metadata_key(wrap, bytes(range(32))).hex() == "13023cb37e5faf2da6ea64ba7c79cc62"


@pytest.mark.parametrize(
    ("path", "norm"),
    [
        ("//x", "/x"),
        ("/", "/"),
        ("/..", "/"),
        ("/a/../..", "/"),
        ("a/./b/", "a/b"),
        ("./a//b/.", "a/b"),
        ("..", ".."),
        ("../..", "../.."),
        ("a/../..", ".."),
        ("../a/../b", "../b"),
        ("a/b/../../../c", "../c"),
        ("", ""),
        (".", ""),
        ("enc_files/input.txt", "enc_files/input.txt"),
    ],
)
def test_gramine_path_normalisation(path: str, norm: str):
    assert gramine_norm_path(path) == norm


@given(st.lists(st.sampled_from(["", ".", "..", "a", "b", "cc"]), max_size=8), st.booleans())
def test_norm_path_is_idempotent_and_clean(parts: list[str], absolute: bool):
    p = ("/" if absolute else "") + "/".join(parts)
    n = gramine_norm_path(p)
    assert gramine_norm_path(n) == n
    assert n == "/" or ("//" not in n and not n.endswith("/"))
    assert all(c not in ("", ".") for c in n.strip("/").split("/")) or n in ("", "/")


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("size", [0, 3072, 3073, 396289, 3072 + 96 * 4096 * 33 + 1])
def test_roundtrip_and_size_like_gramine(tmp_path: Path, version: int, size: int, reader: str):
    key = generate_key(Format.GRAMINE_PF)
    data = os.urandom(size)
    (tmp_path / "in").write_bytes(data)
    out = tmp_path / "out.pf"
    encrypt_file(tmp_path / "in", out, key, fmt=Format.GRAMINE_PF, gramine_version=version)
    raw = out.read_bytes()
    assert len(raw) == g.node_count(size) * g.NODE_SIZE
    assert raw[:8] == b"GRAFS_PF" and raw[8] == version
    with open_protected(out, key) as f:  # bound to OUT as given, as pf-crypt does
        assert f.stored_path == gramine_norm_path(str(out))
        assert f.read() == data


def test_writer_stores_normalised_path(tmp_path: Path):
    key = generate_key(Format.GRAMINE_PF)
    (tmp_path / "in").write_bytes(b"x" * 5000)
    encrypt_file(tmp_path / "in", tmp_path / "o", key, fmt=Format.GRAMINE_PF, bind="./a//b/../c")
    with open_protected(tmp_path / "o", key, bind="a/c") as f:
        assert f.stored_path == "a/c"


def test_pending_write_flag_is_refused(tmp_path: Path):
    key = generate_key(Format.GRAMINE_PF)
    sink = io.BytesIO()
    with g.GramineWriter(sink, key, "f", version=2) as w:
        w.write(b"y" * 10)
    raw = bytearray(sink.getvalue())
    raw[58] |= g.HAS_PENDING_WRITE
    (tmp_path / "f").write_bytes(raw)
    with pytest.raises(IntegrityError, match="unfinished write"):
        open_protected(tmp_path / "f", key, bind="f")


def test_every_node_is_authenticated(tmp_path: Path, reader: str):
    """Flip one byte in each physical node of a two-MHT file: each is detected on read."""
    key = generate_key(Format.GRAMINE_PF)
    size = 3072 + 97 * 4096
    (tmp_path / "in").write_bytes(os.urandom(size))
    good = tmp_path / "good"
    encrypt_file(tmp_path / "in", good, key, fmt=Format.GRAMINE_PF, bind="f")
    nodes = good.stat().st_size // g.NODE_SIZE
    for node in range(nodes):
        bad = tmp_path / "bad"
        shutil.copyfile(good, bad)
        with bad.open("r+b") as f:
            f.seek(node * g.NODE_SIZE + 100)
            b = f.read(1)
            f.seek(node * g.NODE_SIZE + 100)
            f.write(bytes([b[0] ^ 0x80]))
        with pytest.raises(IntegrityError):
            with open_protected(bad, key, bind="f") as f:
                f.read()


def test_aborted_writer_leaves_unreadable_file(tmp_path: Path):
    key = generate_key(Format.GRAMINE_PF)
    path = tmp_path / "f"
    with path.open("w+b") as sink:
        w = g.GramineWriter(sink, key, "f")
        w.write(b"z" * 10000)
        w.abort()
    with pytest.raises(FormatError):
        open_protected(path, key, bind="f")


def test_native_and_python_name_the_same_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if not g.native_accelerator():
        pytest.skip("the gramine-pf C helper is not built here")
    key = generate_key(Format.GRAMINE_PF)
    (tmp_path / "in").write_bytes(os.urandom(3072 + 50 * 4096))
    encrypt_file(tmp_path / "in", tmp_path / "f", key, fmt=Format.GRAMINE_PF, bind="f")
    with (tmp_path / "f").open("r+b") as f:  # data node 7 of MHT node 0: physical node 2 + 7
        f.seek(9 * g.NODE_SIZE + 5)
        byte = f.read(1)[0]
        f.seek(9 * g.NODE_SIZE + 5)
        f.write(bytes([byte ^ 0xFF]))  # always a change (writing 0xff left a 0xff byte as it was)
    messages = []
    for native in (g._native, None):
        monkeypatch.setattr(g, "_native", native)
        buf = bytearray(60 * 4096)
        with open_protected(tmp_path / "f", key, bind="f") as f, pytest.raises(IntegrityError) as e:
            f.readinto(buf)
        messages.append(str(e.value))
        # the first 3072 bytes (inline in the authenticated metadata) are fine; no byte of the
        # refused run of data nodes may stay in the caller's buffer
        assert not any(buf[g.MD_USER_DATA_SIZE :]), "plaintext of a refused run was left behind"
    assert messages[0] == messages[1] and "data node 7" in messages[0]


def test_native_helper_checks_its_buffers():
    if not g.native_accelerator():
        pytest.skip("the gramine-pf C helper is not built here")
    native = g._native
    assert native is not None
    mht, node = bytes(4096), bytes(4096)
    for args in [
        (mht, 0, node, bytearray(4096), 2),  # source and output hold one node, not two
        (mht, 127, node * 2, bytearray(8192), 2),  # slot 128 would be past the MHT node
        (mht[:64], 1, node * 2, bytearray(8192), 2),  # MHT buffer too short for slot 2
        (mht, -1, node, bytearray(4096), 1),
        (mht, 0, node, bytearray(4096), -1),
    ]:
        with pytest.raises(ValueError):
            native.decrypt_nodes(*args)
    with pytest.raises(TypeError):
        native.decrypt_nodes(mht, 0, node, bytes(4096), 1)  # output not writable
    assert native.decrypt_nodes(mht, 0, node, bytearray(4096), 0) == -1  # nothing to do
    assert native.decrypt_nodes(mht, 0, node, bytearray(4096), 1) == 0  # zero tag: refused


def _native_or_skip():  # type: ignore[no-untyped-def]
    if not g.native_accelerator():
        pytest.skip("the gramine-pf C helper is not built here")
    assert g._native is not None
    return g._native


def test_native_encrypt_checks_its_buffers():
    native = _native_or_skip()
    keys, node = bytes(32), bytes(4096)
    for args in [
        (keys, node, bytearray(8192), bytearray(4096), 0, 2),  # one node of plaintext, not two
        (keys, node * 2, bytearray(4096), bytearray(4096), 0, 2),  # output holds one node
        (keys[:16], node * 2, bytearray(8192), bytearray(4096), 0, 2),  # one key for two nodes
        (keys, node * 2, bytearray(8192), bytearray(4096), 127, 2),  # slot 128: past the node
        (keys, node, bytearray(4096), bytearray(4096), -1, 1),
        (keys, node, bytearray(4096), bytearray(4096), 0, -1),
    ]:
        with pytest.raises(ValueError):
            native.encrypt_nodes(*args)
    with pytest.raises(TypeError):
        native.encrypt_nodes(keys, node, bytes(4096), bytearray(4096), 0, 1)  # output read-only
    with pytest.raises(TypeError):
        native.encrypt_nodes(keys, node, bytearray(4096), bytes(4096), 0, 1)  # MHT read-only


def test_native_encrypt_matches_aes_gcm_and_records_key_and_tag():
    """One node through the helper against cryptography's AES-128-GCM (zero IV, no AD)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    native = _native_or_skip()
    keys, plain = os.urandom(32), os.urandom(8192)
    out, mht = bytearray(8192), bytearray(4096)
    native.encrypt_nodes(keys, plain, out, mht, 5, 2)
    for i in range(2):
        ref = AESGCM(keys[16 * i : 16 * i + 16]).encrypt(
            bytes(12), plain[4096 * i : 4096 * (i + 1)], None
        )
        assert bytes(out[4096 * i : 4096 * (i + 1)]) == ref[:4096]
        slot = mht[(5 + i) * 32 : (6 + i) * 32]
        assert bytes(slot) == keys[16 * i : 16 * i + 16] + ref[4096:]
    assert not any(mht[: 5 * 32]) and not any(mht[7 * 32 :])  # no other slot touched


@pytest.mark.parametrize("threads", [1, 3])
def test_native_writer_gives_every_data_node_its_own_key(tmp_path: Path, threads: int):
    """All-zero plaintext: under AES-GCM with the fixed zero IV a reused key would give equal
    ciphertext nodes (and leak the XOR of plaintexts); every data node must differ."""
    from shieldml.files import Outputs

    _native_or_skip()
    key = generate_key(Format.GRAMINE_PF)
    size = g.MD_USER_DATA_SIZE + 4096 * (96 * 3 + 7)
    with Outputs() as outs, outs.file(tmp_path / "f") as out:
        w = g.GramineWriter(out, key, "f", threads=threads)
        w.write(bytes(size))
        w.close()
    raw = (tmp_path / "f").read_bytes()
    nodes = {raw[g._phys_data(d) * 4096 : (g._phys_data(d) + 1) * 4096] for d in range(96 * 3 + 7)}
    assert len(nodes) == 96 * 3 + 7


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk", [1, 1000, 4096, 5000, 96 * 4096 + 3, 1 << 20])
def test_native_writer_output_reads_with_the_python_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int, threads: int
):
    """Writes of every alignment (inside the inline part, across node and MHT boundaries) through
    the C helper, read back by the pure-Python reader (cryptography's AES-GCM checks each tag)."""
    from shieldml.files import Outputs

    _native_or_skip()
    key = generate_key(Format.GRAMINE_PF)
    size = g.MD_USER_DATA_SIZE + 96 * 4096 * 2 + 4096 * 3 + 11
    if chunk == 1:
        size = 20000  # byte by byte: small
    data = os.urandom(size)
    with Outputs() as outs, outs.file(tmp_path / "f") as out:
        w = g.GramineWriter(out, key, "f", version=2, threads=threads)
        for at in range(0, size, chunk):
            w.write(data[at : at + chunk])
        w.close()
    assert (tmp_path / "f").stat().st_size == g.ciphertext_size(size)
    monkeypatch.setattr(g, "_native", None)
    with open_protected(tmp_path / "f", key, bind="f") as f:
        assert f.read() == data


def test_native_writer_goes_on_alone_when_no_thread_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Inside an enclave with a thread limit, starting an encryption thread fails the way CPython
    fails it ("can't start new thread"): the runs not handed to a thread are encrypted by the
    writing thread and the file is complete and correct."""
    from concurrent.futures import ThreadPoolExecutor

    from shieldml.files import Outputs

    _native_or_skip()

    class Limited(ThreadPoolExecutor):
        submitted = 0

        def submit(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
            Limited.submitted += 1
            if Limited.submitted > 2:
                raise RuntimeError("can't start new thread")
            return super().submit(*args, **kwargs)

    import concurrent.futures

    monkeypatch.setattr(
        concurrent.futures, "ThreadPoolExecutor", Limited
    )  # the writer imports it when it starts threads
    key = generate_key(Format.GRAMINE_PF)
    data = os.urandom(g.MD_USER_DATA_SIZE + 96 * 4096 * 5 + 100)
    with Outputs() as outs, outs.file(tmp_path / "f") as out:
        w = g.GramineWriter(out, key, "f", threads=3)
        w.write(data)
        w.close()
    assert Limited.submitted == 3
    monkeypatch.setattr(g, "_native", None)
    with open_protected(tmp_path / "f", key, bind="f") as f:
        assert f.read() == data
