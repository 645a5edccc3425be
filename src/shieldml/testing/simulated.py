"""A simulated TEE platform whose evidence goes through the real verification code.

It issues structurally real Intel SGX v3 and TDX v4 DCAP quotes with full collateral (PCK chain
with the SGX extension, CRLs, signed TCB info and QE identity) under a *simulated* Intel root, and
AMD SEV-SNP reports under a simulated ARK -> ASK -> VCEK chain (RSA-PSS, ECDSA P-384), with the
measurements, report data, debug flag and TCB the caller chooses. Nothing is special-cased in
verification: the evidence verifies only when :meth:`SimulatedPlatform.trust` adds the simulated
roots to the anchors, and is otherwise refused as "untrusted root (simulated)".

The platform is persistent: :meth:`SimulatedPlatform.open` keeps its keys in a directory, so a
runner and a broker in different processes share one platform.

The platform never reads the wall clock by itself: :meth:`SimulatedPlatform.create` and
:meth:`SimulatedPlatform.open` take the clock that dates its certificates, collateral and evidence
(``system_clock`` in a real run, a fixed time in a test that verifies at that time), so evidence and
its verification agree on the date whatever today is.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from shieldml.attest import _der, iso_utc
from shieldml.attest._intel_collateral import SGX_EXTENSION_OID, IntelCollateral
from shieldml.attest._intel_quote import HEADER, INTEL_QE_VENDOR_ID, TEE_SGX, TEE_TDX
from shieldml.attest._snp import AMD_OID, REPORT_SIZE, SIGNED_SIZE, build_cert_table
from shieldml.attest._trust import TrustAnchors
from shieldml.errors import ExpiredError, FormatError

Clock = Callable[[], datetime]

ORG = "shieldml simulated"
QE_MRSIGNER = hashlib.sha256(b"shieldml simulated QE").digest()
FMSPC = bytes.fromhex("5e0000000000")
PCE_ID = bytes(2)
CPU_SVN = bytes([7, 7, 2, 2, 4, 1, 0, 5] + [0] * 8)
PCESVN = 13
TEE_TCB_SVN = bytes([6, 1, 3] + [0] * 13)
ADVISORIES = {
    "UpToDate": [],
    "SWHardeningNeeded": ["INTEL-SA-00615"],
    "OutOfDate": ["INTEL-SA-00828"],
}
_KEYS = ("intel_root", "pck_ca", "pck", "tcb_signing", "att", "ark", "ask", "vcek")
_RSA_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class _KeptKeys(dict[str, PrivateKey]):
    """A kept platform's private keys, each loaded from its PEM on first use. Loading checks
    every key (an RSA-4096 key takes about 0.2 s), and most users of a kept platform (a broker
    that trusts it, a verifier) need only its certificates, or one or two of its keys."""

    def __init__(self, pems: dict[str, str], where: Path) -> None:
        super().__init__()
        self._pems, self._where = pems, where

    def __missing__(self, name: str) -> PrivateKey:
        key = serialization.load_pem_private_key(self._pems[name].encode(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise FormatError(
                f"{self._where}: the simulated platform's {name} key is neither EC nor RSA"
            )
        self[name] = key
        return key


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
        ]
    )


def _raw_sig(
    key: ec.EllipticCurvePrivateKey, data: bytes, size: int = 32, little: bool = False
) -> bytes:
    h = hashes.SHA256() if size == 32 else hashes.SHA384()
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(h)))
    if little:
        return r.to_bytes(size, "little") + s.to_bytes(size, "little")
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def system_clock() -> datetime:
    """The wall clock, for a simulated platform that serves a real (not a test's) run."""
    return datetime.now(UTC)


def fixed_clock(at: datetime) -> Clock:
    """A clock that always reads ``at`` (tests that verify at one fixed time)."""
    if at.tzinfo is None:
        raise ValueError("fixed_clock needs an aware datetime")
    return lambda: at


@dataclass
class SimulatedPlatform:
    """Keys and certificates of one simulated machine (Intel and AMD sides)."""

    keys: dict[str, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]
    certs: dict[str, x509.Certificate]
    chip_id: bytes
    clock: Clock = field(default=system_clock, compare=False)

    # -- life cycle -------------------------------------------------------------------------
    @classmethod
    def create(cls, *, clock: Clock) -> SimulatedPlatform:
        """A fresh platform whose certificates are valid from ``clock()`` - 1 day for 10 years.

        RSA-4096 AMD roots take about a second.
        """
        now = clock()
        keys: dict[str, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey] = {
            k: ec.generate_private_key(ec.SECP256R1()) for k in _KEYS[:5]
        }
        keys["ark"] = rsa.generate_private_key(65537, 4096)
        keys["ask"] = rsa.generate_private_key(65537, 4096)
        keys["vcek"] = ec.generate_private_key(ec.SECP384R1())
        chip_id = hashlib.sha512(os.urandom(32)).digest()
        plat = cls(keys, {}, chip_id, clock)
        plat._issue_certificates(now)
        return plat

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, clock: Clock) -> SimulatedPlatform:
        """Load the platform kept in ``directory``, creating it there on first use.

        ``clock`` dates everything the platform issues from now on; a kept platform whose
        certificates do not cover ``clock()`` is refused (ShieldError) rather than used to make
        evidence that cannot verify.
        """
        d = Path(directory)
        if (d / "platform.json").exists():
            plat = cls._load(d, clock)
            plat._check_covers(d, clock())
            return plat
        plat = cls.create(clock=clock)
        plat.save(d)
        return plat

    def _check_covers(self, d: Path, now: datetime) -> None:
        for name, cert in self.certs.items():
            start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
            if not start <= now <= end:
                raise ExpiredError(
                    str(d),
                    f"the simulated platform's {name} certificate is valid "
                    f"{iso_utc(start)} .. {iso_utc(end)}, but the clock reads {iso_utc(now)}",
                    hint="remove the directory to make a new simulated platform",
                )

    def save(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {
            "chip_id": self.chip_id.hex(),
            "keys": {
                k: v.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ).decode()
                for k, v in ((k, self.keys[k]) for k in _KEYS)
            },
            "certs": {
                k: v.public_bytes(serialization.Encoding.PEM).decode()
                for k, v in self.certs.items()
            },
        }
        tmp = d / "platform.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        tmp.replace(d / "platform.json")

    @classmethod
    def _load(cls, d: Path, clock: Clock) -> SimulatedPlatform:
        doc = json.loads((d / "platform.json").read_text())
        pems = doc["keys"]
        if not isinstance(pems, dict) or set(pems) != set(_KEYS):
            raise FormatError(f"{d}: the simulated platform needs the keys {', '.join(_KEYS)}")
        keys = _KeptKeys(pems, d)
        certs = {k: x509.load_pem_x509_certificate(v.encode()) for k, v in doc["certs"].items()}
        return cls(keys, certs, bytes.fromhex(doc["chip_id"]), clock)

    def trust(self, anchors: TrustAnchors | None = None) -> TrustAnchors:
        """``anchors`` (default: the vendor roots) plus this platform's simulated roots."""
        anchors = anchors or TrustAnchors()
        return anchors.with_simulated(self.certs["intel_root"]).with_simulated(self.certs["ark"])

    def _ec(self, name: str) -> ec.EllipticCurvePrivateKey:
        key = self.keys[name]
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError(f"simulated platform key {name} is not an EC key")
        return key

    @property
    def intel_root(self) -> x509.Certificate:
        return self.certs["intel_root"]

    @property
    def amd_ark(self) -> x509.Certificate:
        return self.certs["ark"]

    # -- certificates -----------------------------------------------------------------------
    def _cert(
        self,
        name: str,
        cn: str,
        issuer: str,
        issuer_cn: str,
        now: datetime,
        *,
        ca: bool,
        extensions: list[x509.ExtensionType] | None = None,
    ) -> None:
        key = self.keys[name]
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(issuer_cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        for ext in extensions or []:
            b = b.add_extension(ext, critical=False)
        signer = self.keys[issuer]
        if isinstance(signer, rsa.RSAPrivateKey):
            self.certs[name] = b.sign(signer, hashes.SHA384(), rsa_padding=_RSA_PSS)
        else:
            self.certs[name] = b.sign(signer, hashes.SHA256())

    def _issue_certificates(self, now: datetime) -> None:
        self._cert(
            "intel_root", "Intel SGX Root CA", "intel_root", "Intel SGX Root CA", now, ca=True
        )
        self._cert(
            "pck_ca", "Intel SGX PCK Processor CA", "intel_root", "Intel SGX Root CA", now, ca=True
        )
        self._cert(
            "tcb_signing", "Intel SGX TCB Signing", "intel_root", "Intel SGX Root CA", now, ca=False
        )
        self._cert(
            "pck",
            "Intel SGX PCK Certificate",
            "pck_ca",
            "Intel SGX PCK Processor CA",
            now,
            ca=False,
            extensions=[self._sgx_extension()],
        )
        self._cert("ark", "ARK-Milan", "ark", "ARK-Milan", now, ca=True)
        self._cert("ask", "SEV-Milan", "ark", "ARK-Milan", now, ca=True)
        self._cert(
            "vcek",
            "SEV-VCEK",
            "ask",
            "SEV-Milan",
            now,
            ca=False,
            extensions=self._vcek_extensions(),
        )

    def _sgx_extension(self) -> x509.UnrecognizedExtension:
        o = SGX_EXTENSION_OID
        tcb = [
            _der.encode_seq(_der.encode_oid(f"{o}.2.{i + 1}"), _der.encode_int(v))
            for i, v in enumerate(CPU_SVN)
        ]
        tcb.append(_der.encode_seq(_der.encode_oid(f"{o}.2.17"), _der.encode_int(PCESVN)))
        tcb.append(
            _der.encode_seq(_der.encode_oid(f"{o}.2.18"), _der.encode(_der.OCTET_STRING, CPU_SVN))
        )
        value = _der.encode_seq(
            _der.encode_seq(
                _der.encode_oid(f"{o}.1"),
                _der.encode(_der.OCTET_STRING, hashlib.sha256(self.chip_id).digest()[:16]),
            ),
            _der.encode_seq(_der.encode_oid(f"{o}.2"), _der.encode_seq(*tcb)),
            _der.encode_seq(_der.encode_oid(f"{o}.3"), _der.encode(_der.OCTET_STRING, PCE_ID)),
            _der.encode_seq(_der.encode_oid(f"{o}.4"), _der.encode(_der.OCTET_STRING, FMSPC)),
            _der.encode_seq(_der.encode_oid(f"{o}.5"), _der.encode(_der.ENUMERATED, b"\x00")),
        )
        return x509.UnrecognizedExtension(x509.ObjectIdentifier(o), value)

    def _vcek_extensions(self, tcb: dict[str, int] | None = None) -> list[x509.ExtensionType]:
        def ext(suffix: str, value: bytes) -> x509.UnrecognizedExtension:
            return x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{AMD_OID}.{suffix}"), value)

        tcb = tcb or SNP_TCB
        return [
            ext("1", _der.encode_int(0)),
            ext("2", _der.encode(_der.IA5STRING, b"Milan-B0")),
            ext("3.1", _der.encode_int(tcb["bl"])),
            ext("3.2", _der.encode_int(tcb["tee"])),
            ext("3.3", _der.encode_int(tcb["snp"])),
            ext("3.8", _der.encode_int(tcb["ucode"])),
            ext("4", self.chip_id),
        ]

    # -- Intel ------------------------------------------------------------------------------
    def _collateral(
        self, tee: str, status: str, now: datetime, evaluation: int = 1
    ) -> IntelCollateral:
        issue, nxt = now - timedelta(hours=1), now + timedelta(days=30)
        root, pck_ca = self.keys["intel_root"], self.keys["pck_ca"]

        def crl(
            signer: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, issuer_cn: str
        ) -> x509.CertificateRevocationList:
            b = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(_name(issuer_cn))
                .last_update(issue)
                .next_update(nxt)
            )
            return b.sign(signer, hashes.SHA256())

        tcb: dict[str, object] = {
            "sgxtcbcomponents": [{"svn": v} for v in CPU_SVN],
            "pcesvn": PCESVN,
        }
        level: dict[str, object] = {
            "tcb": tcb,
            "tcbDate": "2025-01-01T00:00:00Z",
            "tcbStatus": status,
            "advisoryIDs": ADVISORIES.get(status, []),
        }
        info: dict[str, object] = {
            "id": tee, "version": 3, "issueDate": iso_utc(issue), "nextUpdate": iso_utc(nxt),
            "fmspc": FMSPC.hex().upper(), "pceId": PCE_ID.hex(), "tcbType": 0, "tcbEvaluationDataNumber": evaluation,
        }  # fmt: skip
        if tee == "TDX":
            tcb["tdxtcbcomponents"] = [{"svn": v} for v in TEE_TCB_SVN]
            zero = "00" * 48
            info["tdxModule"] = {
                "mrsigner": zero,
                "attributes": "00" * 8,
                "attributesMask": "FF" * 8,
            }
            info["tdxModuleIdentities"] = [
                {"id": "TDX_01", "mrsigner": zero, "attributes": "00" * 8, "attributesMask": "FF" * 8,
                 "tcbLevels": [{"tcb": {"isvsvn": TEE_TCB_SVN[0]}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"}]}
            ]  # fmt: skip
        info["tcbLevels"] = [level]
        qe = {
            "id": "TD_QE" if tee == "TDX" else "QE", "version": 2, "issueDate": iso_utc(issue), "nextUpdate": iso_utc(nxt),
            "tcbEvaluationDataNumber": evaluation, "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000", "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": QE_MRSIGNER.hex().upper(), "isvprodid": 2 if tee == "TDX" else 1,
            "tcbLevels": [{"tcb": {"isvsvn": 8}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"}],
        }  # fmt: skip
        tcb_raw = json.dumps(info, separators=(",", ":")).encode()
        qe_raw = json.dumps(qe, separators=(",", ":")).encode()
        signer = self._ec("tcb_signing")
        chain = [self.certs["tcb_signing"], self.certs["intel_root"]]
        return IntelCollateral(
            pck_crl_issuer_chain=[self.certs["pck_ca"], self.certs["intel_root"]],
            root_ca_crl=crl(root, "Intel SGX Root CA"),
            pck_crl=crl(pck_ca, "Intel SGX PCK Processor CA"),
            tcb_info_issuer_chain=chain,
            tcb_info=tcb_raw,
            tcb_info_signature=_raw_sig(signer, tcb_raw),
            qe_identity_issuer_chain=chain,
            qe_identity=qe_raw,
            qe_identity_signature=_raw_sig(signer, qe_raw),
        )

    def _quote(self, version: int, tee_type: int, body: bytes) -> bytes:
        att, pck = self._ec("att"), self._ec("pck")
        header = HEADER.pack(version, 2, tee_type, 8, PCESVN, INTEL_QE_VENDOR_ID, bytes(20))
        signed = header + body
        att_pub = att.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        auth = os.urandom(32)
        qe = bytearray(384)
        qe[0:16] = CPU_SVN
        qe[48:64] = bytes.fromhex("11000000000000000000000000000000")
        qe[128:160] = QE_MRSIGNER
        struct.pack_into("<HH", qe, 256, 2 if tee_type == TEE_TDX else 1, 8)
        qe[320:352] = hashlib.sha256(att_pub + auth).digest()
        chain = b"".join(
            self.certs[k].public_bytes(serialization.Encoding.PEM)
            for k in ("pck", "pck_ca", "intel_root")
        )
        qe_cert = bytes(qe) + _raw_sig(pck, bytes(qe)) + struct.pack("<H", len(auth)) + auth
        qe_cert += struct.pack("<HI", 5, len(chain)) + chain
        sig = _raw_sig(att, signed)
        if version == 3:
            sig_data = sig + att_pub + qe_cert
        else:
            sig_data = sig + att_pub + struct.pack("<HI", 6, len(qe_cert)) + qe_cert
        return signed + struct.pack("<I", len(sig_data)) + sig_data

    def sgx_quote(
        self,
        *,
        report_data: bytes = bytes(64),
        mrenclave: bytes = bytes(32),
        mrsigner: bytes = bytes(32),
        isv_prod_id: int = 0,
        isv_svn: int = 0,
        debug: bool = False,
        tcb_status: str = "UpToDate",
        now: datetime | None = None,
    ) -> tuple[bytes, IntelCollateral]:
        """An SGX DCAP quote v3 and its collateral."""
        now = now or self.clock()
        body = bytearray(384)
        body[0:16] = CPU_SVN
        body[48] = 0x05 | (0x02 if debug else 0)  # INIT, MODE64BIT (+ DEBUG)
        body[56] = 0xE7
        body[64:96] = mrenclave
        body[128:160] = mrsigner
        struct.pack_into("<HH", body, 256, isv_prod_id, isv_svn)
        body[320:384] = report_data.ljust(64, b"\0")
        return self._quote(3, TEE_SGX, bytes(body)), self.collateral("sgx", tcb_status, now)

    def collateral(
        self,
        tee: str,
        tcb_status: str = "UpToDate",
        now: datetime | None = None,
        *,
        evaluation_data_number: int = 1,
    ) -> IntelCollateral:
        """Fresh collateral for this platform's ``sgx`` or ``tdx`` quotes (valid 30 days from ``now``),
        numbered ``evaluation_data_number`` (its tcbEvaluationDataNumber: higher is newer).

        Quotes from one platform share collateral, so a caller making many quotes can fetch it once
        (as a PCCS cache would) and take only the quote from :meth:`sgx_quote` / :meth:`tdx_quote`.
        """
        return self._collateral(
            tee.upper(), tcb_status, now or self.clock(), evaluation_data_number
        )

    def tdx_quote(
        self,
        *,
        report_data: bytes = bytes(64),
        mrtd: bytes = bytes(48),
        rtmrs: tuple[bytes, bytes, bytes, bytes] = (bytes(48),) * 4,
        mr_config_id: bytes = bytes(48),
        mr_owner: bytes = bytes(48),
        mr_owner_config: bytes = bytes(48),
        debug: bool = False,
        sept_ve_disable: bool = True,
        xfam: bytes = (0xE7).to_bytes(8, "little"),
        tcb_status: str = "UpToDate",
        now: datetime | None = None,
    ) -> tuple[bytes, IntelCollateral]:
        """A TDX DCAP quote v4 (TD 1.0 body) and its collateral.

        ``mr_config_id``, ``mr_owner`` and ``mr_owner_config`` are what the host sets when it
        launches the TD (a job's or an initdata's digest); ``rtmrs`` the four RTMRs as they stand.
        """
        now = now or self.clock()
        body = bytearray(584)
        body[0:16] = TEE_TCB_SVN
        attrs = (1 if debug else 0) | ((1 << 28) if sept_ve_disable else 0)
        body[120:128] = attrs.to_bytes(8, "little")
        if len(xfam) != 8:
            raise ValueError("XFAM is 8 bytes")
        body[128:136] = xfam
        body[136:184] = mrtd
        for off, value in ((184, mr_config_id), (232, mr_owner), (280, mr_owner_config)):
            if len(value) != 48:
                raise ValueError("MRCONFIGID, MROWNER and MROWNERCONFIG are 48 bytes")
            body[off : off + 48] = value
        for i, r in enumerate(rtmrs):
            body[328 + 48 * i : 376 + 48 * i] = r
        body[520:584] = report_data.ljust(64, b"\0")
        return self._quote(4, TEE_TDX, bytes(body)), self.collateral("tdx", tcb_status, now)

    def ratls_certificate(
        self,
        *,
        mrenclave: bytes = bytes(32),
        mrsigner: bytes = bytes(32),
        debug: bool = False,
        now: datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """A Gramine-style RA-TLS certificate (P-384 key, legacy quote extension) and its key (PEM).

        As Gramine's ``ra_tls_create_key_and_crt``: the quote's REPORTDATA starts with SHA-256 of
        the certificate's SubjectPublicKeyInfo.
        """
        now = now or self.clock()
        key = ec.generate_private_key(ec.SECP384R1())
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        quote, _ = self.sgx_quote(
            report_data=hashlib.sha256(spki).digest(),
            mrenclave=mrenclave,
            mrsigner=mrsigner,
            debug=debug,
            now=now,
        )
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "RATLS"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "GramineDevelopers"),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=365))
            .add_extension(
                x509.UnrecognizedExtension(
                    x509.ObjectIdentifier("0.6.9.42.840.113741.1337.6"), quote
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        pem_key = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), pem_key

    # -- AMD --------------------------------------------------------------------------------
    def snp_report(
        self,
        *,
        report_data: bytes = bytes(64),
        measurement: bytes = bytes(48),
        host_data: bytes = bytes(32),
        id_key_digest: bytes = bytes(48),
        author_key_digest: bytes = bytes(48),
        policy: int = 0x30000,
        vmpl: int = 0,
        debug: bool = False,
        reported_tcb: dict[str, int] | None = None,
        now: datetime | None = None,
    ) -> tuple[bytes, bytes, list[x509.Certificate]]:
        """An SEV-SNP report v2, its VCEK (DER) and the ASK + ARK chain.

        ``host_data`` is what the host sets at launch (a job's or an initdata's digest);
        ``id_key_digest`` / ``author_key_digest`` those of the ID block's signing keys.

        ``reported_tcb`` (keys bl, tee, snp, ucode) picks the platform's TCB; as with AMD's KDS,
        the VCEK returned certifies exactly that TCB.
        """
        spl = {**SNP_TCB, **(reported_tcb or {})}
        r = bytearray(REPORT_SIZE)
        struct.pack_into("<IIQ", r, 0, 2, 0, policy | ((1 << 19) if debug else 0))
        struct.pack_into("<II", r, 0x30, vmpl, 1)
        tcb = spl["bl"] | spl["tee"] << 8 | spl["snp"] << 48 | spl["ucode"] << 56
        struct.pack_into("<Q", r, 0x38, tcb)
        r[0x050:0x090] = report_data.ljust(64, b"\0")
        r[0x090:0x0C0] = measurement
        if len(host_data) != 32 or len(id_key_digest) != 48 or len(author_key_digest) != 48:
            raise ValueError("HOST_DATA is 32 bytes, ID_KEY_DIGEST and AUTHOR_KEY_DIGEST 48")
        r[0x0C0:0x0E0] = host_data
        r[0x0E0:0x110] = id_key_digest
        r[0x110:0x140] = author_key_digest
        struct.pack_into("<Q", r, 0x180, tcb)
        r[0x1A0:0x1E0] = self.chip_id
        struct.pack_into("<Q", r, 0x1E0, tcb)
        struct.pack_into("<Q", r, 0x1F0, tcb)
        vcek = self._ec("vcek")
        r[SIGNED_SIZE : SIGNED_SIZE + 144] = (
            lambda s: s[:48].ljust(72, b"\0") + s[48:].ljust(72, b"\0")
        )(_raw_sig(vcek, bytes(r[:SIGNED_SIZE]), 48, little=True))
        cert = self.certs["vcek"]
        if spl != SNP_TCB:
            cert = self._vcek_for(spl, now or self.clock())
        der = cert.public_bytes(serialization.Encoding.DER)
        return bytes(r), der, [self.certs["ask"], self.certs["ark"]]

    def _vcek_for(self, spl: dict[str, int], now: datetime) -> x509.Certificate:
        saved = self.certs["vcek"]
        try:
            self._cert(
                "vcek",
                "SEV-VCEK",
                "ask",
                "SEV-Milan",
                now,
                ca=False,
                extensions=self._vcek_extensions(spl),
            )
            return self.certs["vcek"]
        finally:
            self.certs["vcek"] = saved

    def amd_crl(
        self,
        *,
        revoked: tuple[x509.Certificate, ...] = (),
        now: datetime | None = None,
        valid_for: timedelta = timedelta(days=7),
    ) -> bytes:
        """The ARK's CRL as AMD's KDS serves it (``/vcek/v1/{product}/crl``: DER, RSA-PSS
        SHA-384 by the ARK), listing ``revoked``; issued ``now`` - 1 hour."""
        issued = (now or self.clock()) - timedelta(hours=1)
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certs["ark"].subject)
            .last_update(issued)
            .next_update(issued + valid_for)
        )
        for cert in revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(issued)
                .build()
            )
        key = self.keys["ark"]
        assert isinstance(key, rsa.RSAPrivateKey)
        crl = b.sign(key, hashes.SHA384(), rsa_padding=_RSA_PSS)
        return crl.public_bytes(serialization.Encoding.DER)

    def snp_cert_table(self) -> bytes:
        """The certificate table an extended report carries (configfs-tsm ``auxblob``)."""
        der = serialization.Encoding.DER
        return build_cert_table(
            {k: self.certs[k].public_bytes(der) for k in ("vcek", "ask", "ark")}
        )


SNP_TCB = {"bl": 3, "tee": 0, "snp": 8, "ucode": 115}
