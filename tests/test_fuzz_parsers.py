"""Property-based fuzzing of the remaining parsers of untrusted bytes and text.

Only the project's own errors may escape. Small in `make test`, large in `make fuzz`.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shieldml.attest._intel_collateral import EnclaveIdentity, IntelCollateral, TcbInfo
from shieldml.errors import ShieldError
from shieldml.files import generate_key, open_protected
from shieldml.files._common import Format
from shieldml.policy import Policy
from shieldml.runner.manifest import JobManifest
from tests.conftest import fuzz_examples

GRAMINE_KEY = generate_key(Format.GRAMINE_PF)
STREAM_KEY = generate_key(Format.STREAM)
SETTINGS = settings(
    max_examples=fuzz_examples(150), deadline=None, suppress_health_check=list(HealthCheck)
)


@SETTINGS
@given(
    st.binary(max_size=20000),
    st.sampled_from([b"GRAFS_PF\x01\x00", b"GRAFS_PF\x02\x00", b"SHIELDML\x01", b""]),
)
def test_protected_file_headers(data: bytes, prefix: bytes):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f"
        p.write_bytes(prefix + data)
        for key in (GRAMINE_KEY, STREAM_KEY):
            try:
                with open_protected(p, key, bind="f") as f:
                    f.read()
            except ShieldError:
                pass


@SETTINGS
@given(st.text(max_size=2000))
def test_policy_text(text: str):
    with contextlib.suppress(ShieldError):
        Policy.from_toml(text)


@SETTINGS
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=40),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=6),
        max_leaves=30,
    )
)
def test_policy_structures(doc: object):
    with contextlib.suppress(ShieldError):
        Policy.from_dict({"profile": [doc]})


@SETTINGS
@given(st.text(max_size=2000))
def test_job_manifest_text(text: str):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "job.toml"
        p.write_text(text)
        with contextlib.suppress(ShieldError):
            JobManifest.load(p)


@SETTINGS
@given(st.binary(max_size=3000))
def test_collateral_json(data: bytes):
    for parse in (IntelCollateral.from_json, TcbInfo.from_json, EnclaveIdentity.from_json):
        with contextlib.suppress(ShieldError):
            parse(data)
