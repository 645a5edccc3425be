"""Gramine deployment: the generated manifest and the SIGSTRUCT parser."""

from __future__ import annotations

import hashlib
import struct
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from shieldml.errors import FormatError, IntegrityError, ManifestError
from shieldml.gramine.manifest import CA_PATH, gramine_manifest
from shieldml.gramine.sigstruct import HEADER, HEADER2, Sigstruct
from shieldml.policy import Policy
from shieldml.runner.manifest import JobManifest


def build_sigstruct(
    mrenclave: bytes, *, prod: int = 7, svn: int = 3, debug: bool = False
) -> tuple[bytes, rsa.RSAPrivateKey]:
    """A SIGSTRUCT made the way gramine-sgx-sign makes one (RSA-3072, e = 3)."""
    key = rsa.generate_private_key(public_exponent=3, key_size=3072)
    s = bytearray(1808)
    s[0:16] = HEADER
    struct.pack_into("<II", s, 16, 0, 0x20261129)
    s[24:40] = HEADER2
    n = key.public_key().public_numbers().n
    s[128:512] = n.to_bytes(384, "little")
    struct.pack_into("<I", s, 512, 3)
    struct.pack_into("<Q", s, 928, 0x04 | (0x02 if debug else 0))
    s[960:992] = mrenclave
    struct.pack_into("<HH", s, 1024, prod, svn)
    sig = key.sign(bytes(s[0:128] + s[900:1028]), padding.PKCS1v15(), hashes.SHA256())
    s[516:900] = int.from_bytes(sig, "big").to_bytes(384, "little")
    return bytes(s), key


def test_sigstruct_profile():
    mre = hashlib.sha256(b"enclave").digest()
    raw, key = build_sigstruct(mre)
    sig = Sigstruct.from_bytes(raw)
    sig.verify()
    assert sig.mrenclave == mre and sig.isv_prod_id == 7 and sig.isv_svn == 3 and not sig.debug
    n = key.public_key().public_numbers().n
    assert sig.mrsigner == hashlib.sha256(n.to_bytes(384, "little")).digest()
    policy = Policy.from_toml(sig.policy_profile())
    assert policy.profiles[0].refs["mrenclave"] == (mre,)


def test_tampered_sigstruct_is_refused():
    raw, _ = build_sigstruct(b"\x01" * 32)
    bad = bytearray(raw)
    bad[960] ^= 1  # MRENCLAVE is signed
    with pytest.raises(IntegrityError):
        Sigstruct.from_bytes(bytes(bad)).verify()
    with pytest.raises(FormatError):
        Sigstruct.from_bytes(raw[:-1])
    with pytest.raises(FormatError):
        Sigstruct.from_bytes(b"\x00" * 1808)


def job(
    tmp_path: Path, fmt: str = "gramine-pf", keys: tuple[str, str] = ("wrap", "wrap")
) -> JobManifest:
    (tmp_path / "app.py").write_text("print(1)\n")
    digest = hashlib.sha256(b"print(1)\n").hexdigest()
    (tmp_path / "job.toml").write_text(f"""
[command]
argv = ["/usr/bin/python3", "app.py"]
[env]
allow = ["LANG"]
set = {{ OMP_NUM_THREADS = "2" }}
[[trusted]]
path = "app.py"
sha256 = "{digest}"
[[broker]]
name = "owner"
url = "https://broker.example:8443"
fingerprint = "{"00" * 32}"
[[input]]
path = "/data/model.pt"
ciphertext = "enc_files/model.pt"
key = "{keys[0]}"
broker = "owner"
format = "{fmt}"
[[output]]
path = "/out/"
ciphertext = "enc_out/"
key = "{keys[1]}"
broker = "owner"
format = "{fmt}"
""")
    return JobManifest.load(tmp_path / "job.toml")


def test_generated_manifest(tmp_path: Path):
    ca = tmp_path / "broker.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    text = gramine_manifest(job(tmp_path), broker_ca=ca)
    rendered = (
        text.replace("{{ gramine.libos }}", "/lib/libos.so")
        .replace("{{ gramine.runtimedir() }}", "/rt")
        .replace("{{ arch_libdir }}", "/lib/x86_64")
    )
    doc = tomllib.loads(rendered)
    assert doc["sgx"]["remote_attestation"] == "dcap" and doc["sgx"]["debug"] is False
    assert "insecure__" not in text
    env = doc["loader"]["env"]
    assert (
        env["SECRET_PROVISION_SERVERS"] == "broker.example:4433"
        and env["SECRET_PROVISION_SET_KEY"] == "wrap"
    )
    assert env["SECRET_PROVISION_CA_CHAIN_PATH"] == CA_PATH and env["LANG"] == {"passthrough": True}
    enc = [mnt for mnt in doc["fs"]["mounts"] if mnt.get("type") == "encrypted"]
    assert {(mnt["path"], mnt["key_name"]) for mnt in enc} == {
        ("/data/model.pt", "wrap"),
        ("/out", "wrap"),
    }
    assert all(mnt["uri"].startswith(f"file:{tmp_path}") for mnt in enc)
    trusted = {t["uri"]: t["sha256"] for t in doc["sgx"]["trusted_files"] if isinstance(t, dict)}
    assert trusted[f"file:{tmp_path}/app.py"] == hashlib.sha256(b"print(1)\n").hexdigest()
    assert trusted[f"file:{ca}"] == hashlib.sha256(ca.read_bytes()).hexdigest()


def test_manifest_refuses_what_gramine_cannot_do(tmp_path: Path):
    ca = tmp_path / "broker.pem"
    ca.write_text("x")
    with pytest.raises(ManifestError, match="gramine-pf"):
        gramine_manifest(job(tmp_path, fmt="stream"), broker_ca=ca)
    with pytest.raises(ManifestError, match="one key"):
        gramine_manifest(job(tmp_path, keys=("a", "b")), broker_ca=ca)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from shieldml.cli import main

    raw, _ = build_sigstruct(b"\x09" * 32)
    (tmp_path / "app.sig").write_bytes(raw)
    assert main(["gramine", "policy", str(tmp_path / "app.sig")]) == 0
    assert "09" * 32 in capsys.readouterr().out
    job(tmp_path)
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert (
        main(
            [
                "gramine",
                "manifest",
                str(tmp_path / "job.toml"),
                "--broker-ca",
                str(ca),
                "-o",
                str(tmp_path / "app.manifest.template"),
            ]
        )
        == 0
    )
    assert 'sgx.remote_attestation = "dcap"' in (tmp_path / "app.manifest.template").read_text()


def test_digits_sgx_example(tmp_path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_job", Path(__file__).resolve().parents[2] / "examples" / "digits-sgx" / "make_job.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    job_path = mod.make_job(tmp_path / "sgx-job", "https://broker.example:8443", "ab" * 32)
    ca = tmp_path / "broker-cert.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    text = gramine_manifest(JobManifest.load(job_path), broker_ca=ca)
    doc = tomllib.loads(
        text.replace("{{ gramine.libos }}", "/l")
        .replace("{{ gramine.runtimedir() }}", "/r")
        .replace("{{ arch_libdir }}", "/a")
    )
    enc = {m["path"]: m["uri"] for m in doc["fs"]["mounts"] if m.get("type") == "encrypted"}
    assert set(enc) == {"/workload/model", "/workload/data/test_images.pt", "/workload/predictions"}
    assert doc["loader"]["env"]["SECRET_PROVISION_SET_KEY"] == "wrap"
    assert (
        sum(1 for t in doc["sgx"]["trusted_files"] if isinstance(t, dict)) == 3
    )  # two scripts + the CA


def test_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    import json

    from shieldml.cli import main

    raw, _ = build_sigstruct(b"\x09" * 32)
    (tmp_path / "app.sig").write_bytes(raw)
    capsys.readouterr()
    assert main(["gramine", "policy", str(tmp_path / "app.sig"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    sig = Sigstruct.from_bytes(raw)
    assert doc["mrenclave"] == sig.mrenclave.hex() and doc["mrsigner"] == sig.mrsigner.hex()
    assert doc["debug"] is False and doc["profile"] == sig.policy_profile()
    Policy.from_toml(doc["profile"])
    job(tmp_path)
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    args = ["gramine", "manifest", str(tmp_path / "job.toml"), "--broker-ca", str(ca), "--json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["output"] is None and "sgx.trusted_files" in doc["manifest"]
    out = tmp_path / "app.manifest.template"
    assert main([*args, "-o", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"output": str(out), "manifest": None}
    assert out.read_text().startswith(doc["manifest"][:40])
    # not a SIGSTRUCT: the error object on stderr
    (tmp_path / "bad.sig").write_bytes(b"x" * 10)
    assert main(["gramine", "policy", str(tmp_path / "bad.sig"), "--json"]) == 1
    err = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert err["type"] == "FormatError" and "SIGSTRUCT" in err["error"]
