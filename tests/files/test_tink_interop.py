"""The bytes after the shieldml header are exactly a Tink AesGcmHkdfStreaming ciphertext.

Checked in both directions with Google's own ``tink`` package (test-only dependency).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from shieldml.files import Format, encrypt_file, generate_key, key_id, open_protected
from shieldml.files import _stream as s

tink = pytest.importorskip("tink")
from tink import secret_key_access, streaming_aead  # noqa: E402
from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2  # noqa: E402

SIZES = [0, 1, (1 << 20) - 56, (1 << 20) - 55, 3 * (1 << 20) + 12345]


def tink_primitive(key: bytes) -> streaming_aead.StreamingAead:
    streaming_aead.register()
    params = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingParams(
        ciphertext_segment_size=1 << 20, derived_key_size=32, hkdf_hash_type=common_pb2.SHA256
    )
    k = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey(version=0, key_value=key, params=params)
    keyset = tink_pb2.Keyset(
        primary_key_id=7,
        key=[
            tink_pb2.Keyset.Key(
                key_data=tink_pb2.KeyData(
                    type_url="type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey",
                    value=k.SerializeToString(),
                    key_material_type=tink_pb2.KeyData.SYMMETRIC,
                ),
                status=tink_pb2.ENABLED,
                key_id=7,
                output_prefix_type=tink_pb2.RAW,
            )
        ],
    )
    handle = tink.proto_keyset_format.parse(keyset.SerializeToString(), secret_key_access.TOKEN)
    return handle.primitive(streaming_aead.StreamingAead)


class _Keep(io.BytesIO):
    def close(self) -> None:  # tink closes its destination; keep the bytes readable
        pass


@pytest.mark.parametrize("size", SIZES)
def test_tink_decrypts_what_shieldml_writes(tmp_path: Path, size: int):
    key = generate_key(Format.STREAM)
    data = os.urandom(size)
    (tmp_path / "in").write_bytes(data)
    encrypt_file(tmp_path / "in", tmp_path / "out", key, bind="/tee/model.pt")
    blob = (tmp_path / "out").read_bytes()
    header = blob[: s.HEADER_SIZE]
    aad = header + b"/tee/model.pt"
    with tink_primitive(key).new_decrypting_stream(io.BytesIO(blob[s.HEADER_SIZE :]), aad) as d:
        assert d.read() == data


@pytest.mark.parametrize("size", SIZES)
def test_shieldml_reads_what_tink_writes(tmp_path: Path, size: int):
    key = generate_key(Format.STREAM)
    data = os.urandom(size)
    header = s.StreamHeader(1, 1 << 20, key_id(key)).to_bytes()
    sink = _Keep()
    with tink_primitive(key).new_encrypting_stream(sink, header + "/tee/données".encode()) as e:
        e.write(data)
    (tmp_path / "f").write_bytes(header + sink.getvalue())
    with open_protected(tmp_path / "f", key, bind="/tee/données") as f:
        assert f.size == size
        assert f.read() == data


def test_tink_rejects_wrong_bound_path(tmp_path: Path):
    key = generate_key(Format.STREAM)
    (tmp_path / "in").write_bytes(b"secret")
    encrypt_file(tmp_path / "in", tmp_path / "out", key, bind="/a")
    blob = (tmp_path / "out").read_bytes()
    with pytest.raises(tink.TinkError):
        stream = tink_primitive(key).new_decrypting_stream(
            io.BytesIO(blob[s.HEADER_SIZE :]), blob[: s.HEADER_SIZE] + b"/b"
        )
        stream.read()
