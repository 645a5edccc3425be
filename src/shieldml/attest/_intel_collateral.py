"""Intel DCAP collateral: PCK CRLs, TCB info, QE identity, and the PCK certificate's SGX extension.

Collateral arrives as the JSON document the vectors use (dcap-qvl's ``QuoteCollateralV3``: PEM
chains, hex DER CRLs, and the *exact* signed JSON text of ``tcbInfo`` / ``enclaveIdentity``) or as
raw Intel PCS response bodies. Signed JSON is kept byte-exact: re-serialising breaks signatures.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509

from shieldml.attest import _certs, _der
from shieldml.errors import CollateralError, FormatError

MAX_COLLATERAL = 1 << 20
SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
_PCK = SGX_EXTENSION_OID


def _time(value: str, what: str) -> datetime:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, AttributeError) as e:
        raise CollateralError("collateral", f"{what}: bad date {value!r}") from e


def load_pem_chain(pem: bytes | str, what: str) -> list[x509.Certificate]:
    """A certificate chain as concatenated PEM (possibly NUL-terminated) or concatenated DER."""
    raw = (pem.encode() if isinstance(pem, str) else pem).rstrip(b"\0")
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return _certs.pem_certificates(raw)
        certs, pos = [], 0
        while pos < len(raw):
            start = pos
            _tag, _value, pos = _der.read_tlv(raw, pos)
            certs.append(_certs.der_certificate(raw[start:pos]))
        if not certs:
            raise ValueError("empty")
        return certs
    except (ValueError, FormatError) as e:
        raise CollateralError("certificate chain", f"{what}: not a certificate chain") from e


def _crl(hex_der: str, what: str) -> x509.CertificateRevocationList:
    try:
        return _certs.der_crl(bytes.fromhex(hex_der))
    except ValueError as e:
        raise CollateralError("collateral", f"{what}: not a hex DER CRL") from e


@dataclass(frozen=True)
class IntelCollateral:
    """Everything a DCAP quote is checked against, besides the chain inside the quote."""

    pck_crl_issuer_chain: list[x509.Certificate]
    root_ca_crl: x509.CertificateRevocationList
    pck_crl: x509.CertificateRevocationList
    tcb_info_issuer_chain: list[x509.Certificate]
    tcb_info: bytes
    tcb_info_signature: bytes
    qe_identity_issuer_chain: list[x509.Certificate]
    qe_identity: bytes
    qe_identity_signature: bytes

    # Parsing the signed JSON is a function of these immutable bytes, so it happens once per
    # collateral object (a changed document is another object: ``replace`` makes a new one).
    # Its signature and its dates are still checked on every verification.
    @functools.cached_property
    def parsed_tcb_info(self) -> TcbInfo:
        return TcbInfo.from_json(self.tcb_info)

    @functools.cached_property
    def parsed_qe_identity(self) -> EnclaveIdentity:
        return EnclaveIdentity.from_json(self.qe_identity)

    @classmethod
    def from_json(cls, text: str | bytes) -> IntelCollateral:
        """The vectors' / dcap-qvl's collateral JSON."""
        if len(text) > MAX_COLLATERAL:
            raise CollateralError("collateral", "collateral document too large")
        try:
            d = json.loads(text)
            return cls(
                pck_crl_issuer_chain=load_pem_chain(
                    d["pck_crl_issuer_chain"], "PCK CRL issuer chain"
                ),
                root_ca_crl=_crl(d["root_ca_crl"], "root CA CRL"),
                pck_crl=_crl(d["pck_crl"], "PCK CRL"),
                tcb_info_issuer_chain=load_pem_chain(d["tcb_info_issuer_chain"], "TCB info chain"),
                tcb_info=d["tcb_info"].encode(),
                tcb_info_signature=bytes.fromhex(d["tcb_info_signature"]),
                qe_identity_issuer_chain=load_pem_chain(
                    d["qe_identity_issuer_chain"], "QE identity chain"
                ),
                qe_identity=d["qe_identity"].encode(),
                qe_identity_signature=bytes.fromhex(d["qe_identity_signature"]),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            if isinstance(e, CollateralError):
                raise
            raise CollateralError("collateral", f"malformed collateral JSON: {e!r}") from e

    def to_json(self) -> str:
        from cryptography.hazmat.primitives.serialization import Encoding

        def pem(chain: list[x509.Certificate]) -> str:
            return "".join(c.public_bytes(Encoding.PEM).decode() for c in chain)

        return json.dumps(
            {
                "pck_crl_issuer_chain": pem(self.pck_crl_issuer_chain),
                "root_ca_crl": self.root_ca_crl.public_bytes(Encoding.DER).hex(),
                "pck_crl": self.pck_crl.public_bytes(Encoding.DER).hex(),
                "tcb_info_issuer_chain": pem(self.tcb_info_issuer_chain),
                "tcb_info": self.tcb_info.decode(),
                "tcb_info_signature": self.tcb_info_signature.hex(),
                "qe_identity_issuer_chain": pem(self.qe_identity_issuer_chain),
                "qe_identity": self.qe_identity.decode(),
                "qe_identity_signature": self.qe_identity_signature.hex(),
            },
            indent=1,
        )


def signed_member(body: bytes, member: str) -> tuple[bytes, bytes]:
    """From a raw PCS body ``{"tcbInfo": {...}, "signature": "hex"}`` take the exact member text."""
    text = body.decode("utf-8", errors="strict")
    key = f'"{member}"'
    at = text.find(key)
    if at < 0:
        raise CollateralError("collateral", f"PCS response has no {member}")
    start = text.index(":", at + len(key)) + 1
    while text[start] in " \t\r\n":
        start += 1
    try:
        _obj, end = json.JSONDecoder().raw_decode(text, start)
        sig = json.loads(text)["signature"]
    except (ValueError, KeyError) as e:
        raise CollateralError("collateral", f"PCS {member} response is not valid JSON") from e
    return text[start:end].encode(), bytes.fromhex(sig)


@dataclass(frozen=True, kw_only=True)
class TcbLevel:
    """One TCB level. ``*_names`` label components ("BIOS Early Microcode Update") where known,
    ``*_categories`` are their categories alone ("BIOS", "OS/VMM"; "" where not given)."""

    sgx_components: tuple[int, ...]
    pcesvn: int
    tdx_components: tuple[int, ...] | None
    date: str
    status: str
    advisory_ids: tuple[str, ...]
    sgx_names: tuple[str, ...] = ()
    tdx_names: tuple[str, ...] = ()
    sgx_categories: tuple[str, ...] = ()
    tdx_categories: tuple[str, ...] = ()


def _components(
    components: list[dict[str, Any]],
) -> tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
    """SVNs, names ("BIOS Early Microcode Update", or "component N") and categories ("BIOS";
    "" where not given) of a level's components, in one pass."""
    svns, names, categories = [], [], []
    for i, c in enumerate(components):
        svns.append(int(c["svn"]))
        cat, typ = c.get("category"), c.get("type")
        categories.append(str(cat) if cat else "")
        if cat and typ:
            names.append(f"{cat} {typ}")
        elif cat or typ:
            names.append(str(cat or typ))
        else:
            names.append(f"component {i + 1}")
    return tuple(svns), tuple(names), tuple(categories)


@dataclass(frozen=True)
class TdxModuleIdentity:
    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    levels: tuple[tuple[int, str, tuple[str, ...]], ...]  # (isvsvn, status, advisories)


@dataclass(frozen=True)
class TcbInfo:
    """The ``tcbInfo`` object (versions 2 and 3)."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    evaluation_data_number: int
    levels: tuple[TcbLevel, ...]
    tdx_module: TdxModuleIdentity | None
    tdx_module_identities: tuple[TdxModuleIdentity, ...]

    @classmethod
    def from_json(cls, raw: bytes) -> TcbInfo:
        try:
            d = json.loads(raw)
            return cls._from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, CollateralError):
                raise
            raise CollateralError("TCB info", f"malformed tcbInfo: {e!r}") from e

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> TcbInfo:
        version = int(d["version"])
        levels = []
        for lv in d["tcbLevels"]:
            tcb = lv["tcb"]
            sgx_names: tuple[str, ...] = ()
            tdx_names: tuple[str, ...] = ()
            sgx_cats: tuple[str, ...] = ()
            tdx_cats: tuple[str, ...] = ()
            if version >= 3:
                sgx, sgx_names, sgx_cats = _components(tcb["sgxtcbcomponents"])
                tdx = tcb.get("tdxtcbcomponents")
                tdx_t = None
                if tdx is not None:
                    tdx_t, tdx_names, tdx_cats = _components(tdx)
            else:
                sgx = tuple(int(tcb[f"sgxtcbcomp{i:02d}svn"]) for i in range(1, 17))
                tdx_t = None
            if len(sgx) != 16 or (tdx_t is not None and len(tdx_t) != 16):
                raise CollateralError("TCB info", "a TCB level needs 16 components")
            levels.append(
                TcbLevel(
                    sgx_components=sgx,
                    pcesvn=int(tcb["pcesvn"]),
                    tdx_components=tdx_t,
                    date=str(lv.get("tcbDate", "")),
                    status=str(lv["tcbStatus"]),
                    advisory_ids=tuple(lv.get("advisoryIDs", ())),
                    sgx_names=sgx_names,
                    tdx_names=tdx_names,
                    sgx_categories=sgx_cats,
                    tdx_categories=tdx_cats,
                )
            )

        def module(m: dict[str, Any], ident: str) -> TdxModuleIdentity:
            lvls = tuple(
                (int(x["tcb"]["isvsvn"]), str(x["tcbStatus"]), tuple(x.get("advisoryIDs", ())))
                for x in m.get("tcbLevels", ())
            )
            return TdxModuleIdentity(
                ident,
                bytes.fromhex(m["mrsigner"]),
                bytes.fromhex(m["attributes"]),
                bytes.fromhex(m["attributesMask"]),
                lvls,
            )

        mod = d.get("tdxModule")
        return cls(
            id=str(d.get("id", "SGX")),
            version=version,
            issue_date=_time(d["issueDate"], "tcbInfo issueDate"),
            next_update=_time(d["nextUpdate"], "tcbInfo nextUpdate"),
            fmspc=bytes.fromhex(d["fmspc"]),
            pce_id=bytes.fromhex(d["pceId"]),
            evaluation_data_number=int(d.get("tcbEvaluationDataNumber", 0)),
            levels=tuple(levels),
            tdx_module=module(mod, "") if mod else None,
            tdx_module_identities=tuple(
                module(m, str(m["id"])) for m in d.get("tdxModuleIdentities", ())
            ),
        )


@dataclass(frozen=True)
class EnclaveIdentity:
    """The ``enclaveIdentity`` object of the QE (``QE``) or the TD QE (``TD_QE``)."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    levels: tuple[tuple[int, str, tuple[str, ...]], ...]
    evaluation_data_number: int = 0

    @classmethod
    def from_json(cls, raw: bytes) -> EnclaveIdentity:
        try:
            d = json.loads(raw)
            return cls(
                id=str(d["id"]),
                version=int(d["version"]),
                issue_date=_time(d["issueDate"], "QE identity issueDate"),
                next_update=_time(d["nextUpdate"], "QE identity nextUpdate"),
                miscselect=int(d["miscselect"], 16),
                miscselect_mask=int(d["miscselectMask"], 16),
                attributes=bytes.fromhex(d["attributes"]),
                attributes_mask=bytes.fromhex(d["attributesMask"]),
                mrsigner=bytes.fromhex(d["mrsigner"]),
                isvprodid=int(d["isvprodid"]),
                levels=tuple(
                    (int(x["tcb"]["isvsvn"]), str(x["tcbStatus"]), tuple(x.get("advisoryIDs", ())))
                    for x in d["tcbLevels"]
                ),
                evaluation_data_number=int(d.get("tcbEvaluationDataNumber", 0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, CollateralError):
                raise
            raise CollateralError("QE identity", f"malformed enclaveIdentity: {e!r}") from e


@dataclass(frozen=True)
class PckExtension:
    """The PCK certificate's SGX extension (OID 1.2.840.113741.1.13.1), spec §4.7."""

    ppid: bytes
    cpu_svn_components: tuple[int, ...]
    pcesvn: int
    cpusvn: bytes
    pce_id: bytes
    fmspc: bytes
    sgx_type: int

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> PckExtension:
        try:
            ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID))
        except x509.ExtensionNotFound:
            raise FormatError("PCK certificate has no SGX extension") from None
        value = ext.value.public_bytes() if hasattr(ext.value, "public_bytes") else b""
        tag, content, _ = _der.read_tlv(value, 0)
        if tag != _der.SEQUENCE:
            raise FormatError("SGX extension is not a SEQUENCE")
        m = _der.oid_map(content)

        def get(suffix: str, tag: int) -> bytes:
            item = m.get(f"{_PCK}.{suffix}")
            if item is None or item[0] != tag:
                raise FormatError(f"SGX extension lacks {_PCK}.{suffix}")
            return item[1]

        comps = tuple(_der.decode_int(get(f"2.{i}", _der.INTEGER)) for i in range(1, 17))
        return cls(
            ppid=get("1", _der.OCTET_STRING),
            cpu_svn_components=comps,
            pcesvn=_der.decode_int(get("2.17", _der.INTEGER)),
            cpusvn=get("2.18", _der.OCTET_STRING),
            pce_id=get("3", _der.OCTET_STRING),
            fmspc=get("4", _der.OCTET_STRING),
            sgx_type=_der.decode_int(get("5", _der.ENUMERATED)),
        )
