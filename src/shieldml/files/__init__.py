"""Protected files: confidential, integrity-protected, path-bound files in two formats.

``stream`` (default): a shieldml header followed by a Tink AesGcmHkdfStreaming ciphertext.
``gramine-pf``: byte-compatible with Gramine's encrypted files.

>>> key = generate_key()
>>> encrypt_file("model.pt", "model.pt.enc", key, bind="/models/model.pt")   # doctest: +SKIP
>>> with open_protected("model.pt.enc", key, bind="/models/model.pt") as f:  # doctest: +SKIP
...     f.seek(100); f.read(16)
"""

from shieldml.files._api import (
    FileInfo,
    atomic_output,
    auto_workers,
    create_writer,
    decrypt_file,
    decrypt_stream,
    detect_format,
    encrypt_file,
    encrypt_stream,
    inspect_file,
    open_protected,
)
from shieldml.files._common import (
    Format,
    ProgressCallback,
    check_key,
    generate_key,
    key_id,
    load_key,
    write_key_file,
)
from shieldml.files._gramine import PATH_MAX_SIZE as GRAMINE_PATH_MAX
from shieldml.files._gramine import gramine_norm_path
from shieldml.files._output import Outputs
from shieldml.files._reader import ProtectedFile
from shieldml.files._tree import (
    Planned,
    decrypt_path,
    encrypt_path,
    plan_decrypt,
    plan_encrypt,
    rebind_path,
    rekey_path,
)

__all__ = [
    "GRAMINE_PATH_MAX",
    "FileInfo",
    "Format",
    "Outputs",
    "Planned",
    "ProgressCallback",
    "ProtectedFile",
    "atomic_output",
    "auto_workers",
    "check_key",
    "create_writer",
    "decrypt_file",
    "decrypt_path",
    "decrypt_stream",
    "detect_format",
    "encrypt_file",
    "encrypt_path",
    "encrypt_stream",
    "generate_key",
    "gramine_norm_path",
    "inspect_file",
    "key_id",
    "load_key",
    "open_protected",
    "plan_decrypt",
    "plan_encrypt",
    "rebind_path",
    "rekey_path",
    "write_key_file",
]
