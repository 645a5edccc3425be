"""Getting collateral and endorsements from the vendors, through an injectable HTTP fetcher.

Nothing here runs unless a caller passes a fetcher: verification itself never touches the network.
Intel: PCS or a PCCS (same v4 API). AMD: the Key Distribution Service (KDS). Results can be kept in
a :class:`CollateralCache` and are reused while still valid.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from shieldml.attest import _certs
from shieldml.attest._intel_collateral import (
    EnclaveIdentity,
    IntelCollateral,
    PckExtension,
    TcbInfo,
    load_pem_chain,
    signed_member,
)
from shieldml.attest._intel_quote import CERT_PCK_CHAIN, Quote
from shieldml.attest._snp import (
    AMD_PRODUCTS,
    Endorsement,
    SnpReport,
    load_certificate,
    tcb_parts,
)
from shieldml.attest._x509 import cn
from shieldml.errors import CollateralError, FormatError

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
INTEL_ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
INTEL_ROOT_CA_URL = (
    "https://certificates.trustedservices.intel.com/Intel_SGX_Provisioning_Certification_RootCA.cer"
)
AMD_KDS_URL = "https://kdsintf.amd.com"
MAX_RESPONSE = 1 << 20


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: Mapping[str, str]


#: ``fetch(url) -> Response``; tests pass a fake, production :func:`http_fetcher`.
Fetcher = Callable[[str], Response]


def http_fetcher(timeout: float = 10.0) -> Fetcher:
    """A real fetcher over HTTPS (httpx), with a timeout and a response size limit."""
    import httpx

    def fetch(url: str) -> Response:
        try:
            r = httpx.get(url, timeout=timeout, follow_redirects=True)
        except httpx.HTTPError as e:
            raise CollateralError("fetch", f"{url}: {e}") from e
        if len(r.content) > MAX_RESPONSE:
            raise CollateralError("fetch", f"{url}: response too large")
        return Response(r.status_code, r.content, {k.lower(): v for k, v in r.headers.items()})

    return fetch


def _get(fetch: Fetcher, url: str, what: str) -> Response:
    r = fetch(url)
    if r.status != 200:
        raise CollateralError("fetch", f"{what}: {url} answered HTTP {r.status}")
    return r


def _header_chain(r: Response, names: tuple[str, ...], what: str) -> list[x509.Certificate]:
    headers = {k.lower(): v for k, v in r.headers.items()}
    for name in names:
        if name.lower() in headers:
            return load_pem_chain(urllib.parse.unquote(headers[name.lower()]), what)
    raise CollateralError("fetch", f"{what}: response lacks the {names[0]} header")


def _platform(quote_bytes: bytes) -> tuple[str, PckExtension, str]:
    """``(tee, PCK extension, PCK CA kind)`` of a quote: what its collateral is looked up by."""
    quote = Quote.from_bytes(quote_bytes)
    if quote.certification.cert_type != CERT_PCK_CHAIN:
        raise CollateralError("fetch", "the quote carries no PCK chain to look collateral up by")
    chain = load_pem_chain(quote.certification.cert_data, "PCK chain")
    ext = PckExtension.from_certificate(chain[0])
    ca = "platform" if "Platform" in cn(chain[0].issuer) else "processor"
    return ("tdx" if quote.is_tdx else "sgx"), ext, ca


def fetch_intel_collateral(
    quote_bytes: bytes, fetch: Fetcher, base_url: str = INTEL_PCS_URL
) -> IntelCollateral:
    """Fetch the collateral for a DCAP quote from Intel PCS or a PCCS (API v4)."""
    tee, ext, ca = _platform(quote_bytes)
    base = base_url.rstrip("/")
    crl = _get(fetch, f"{base}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der", "PCK CRL")
    tcb = _get(
        fetch, f"{base}/{tee}/certification/v4/tcb?fmspc={ext.fmspc.hex().upper()}", "TCB info"
    )
    qe = _get(fetch, f"{base}/{tee}/certification/v4/qe/identity", "QE identity")
    root_crl = _get(fetch, INTEL_ROOT_CA_CRL_URL, "root CA CRL")
    tcb_raw, tcb_sig = signed_member(tcb.body, "tcbInfo")
    qe_raw, qe_sig = signed_member(qe.body, "enclaveIdentity")
    try:
        pck_crl = _certs.der_crl(crl.body)
        root_ca_crl = _certs.der_crl(root_crl.body)
    except ValueError as e:
        raise CollateralError("fetch", "a CRL response is not DER") from e
    return IntelCollateral(
        pck_crl_issuer_chain=_header_chain(crl, ("SGX-PCK-CRL-Issuer-Chain",), "PCK CRL chain"),
        root_ca_crl=root_ca_crl,
        pck_crl=pck_crl,
        tcb_info_issuer_chain=_header_chain(
            tcb, ("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"), "TCB info chain"
        ),
        tcb_info=tcb_raw,
        tcb_info_signature=tcb_sig,
        qe_identity_issuer_chain=_header_chain(
            qe, ("SGX-Enclave-Identity-Issuer-Chain",), "QE identity chain"
        ),
        qe_identity=qe_raw,
        qe_identity_signature=qe_sig,
    )


def fetch_vcek(
    report_bytes: bytes, fetch: Fetcher, product: str | None = None, base_url: str = AMD_KDS_URL
) -> tuple[bytes, list[x509.Certificate]]:
    """Fetch the VCEK (DER) for an SEV-SNP report's chip and TCB, and its ASK + ARK chain."""
    report = SnpReport.from_bytes(report_bytes)
    gen = report.generation_from_cpuid() or product
    if gen is None:
        raise CollateralError(
            "fetch",
            "cannot tell the AMD product generation of a v2 report",
            hint="name it (Milan, Genoa or Turin)",
        )
    parts = tcb_parts(report.reported_tcb, gen)
    hwid = report.chip_id[:8] if gen == "Turin" else report.chip_id
    query = "&".join(
        f"{k}SPL={parts[k]:02d}" for k in ("fmc", "bl", "tee", "snp", "ucode") if k in parts
    )
    base = base_url.rstrip("/")
    vcek = _get(fetch, f"{base}/vcek/v1/{gen}/{hwid.hex()}?{query}", "VCEK").body
    chain_pem = _get(fetch, f"{base}/vcek/v1/{gen}/cert_chain", "ASK/ARK chain").body
    load_certificate(vcek)
    return vcek, load_pem_chain(chain_pem, "ASK/ARK chain")


def fetch_amd_crl(product: str, fetch: Fetcher, base_url: str = AMD_KDS_URL) -> bytes:
    """AMD's CRL for a product generation (KDS ``/vcek/v1/{product}/crl``: DER, signed by the
    ARK; verification checks the signature). Raises :class:`CollateralError` if it is not a CRL."""
    body = _get(fetch, f"{base_url.rstrip('/')}/vcek/v1/{product}/crl", f"AMD {product} CRL").body
    try:
        _certs.der_crl(body)
    except ValueError as e:
        raise CollateralError("fetch", f"AMD {product} CRL: the response is not a DER CRL") from e
    return body


class CollateralCache:
    """Collateral and VCEKs kept on disk and reused while valid at the verification time."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)

    def _path(self, name: str) -> Path:
        return self.dir / name

    def _store(self, name: str, data: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._path(name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(self._path(name))

    def intel(
        self,
        quote_bytes: bytes,
        *,
        now: datetime,
        fetch: Fetcher | None = None,
        base_url: str = INTEL_PCS_URL,
    ) -> IntelCollateral:
        """Cached collateral for the quote's platform if still valid at ``now``, else fetched."""
        tee, ext, ca = _platform(quote_bytes)
        name = f"intel-{tee}-{ext.fmspc.hex()}-{ca}.json"
        cached = self._cached(name, now)
        if cached is not None:
            return cached
        if fetch is None:
            raise CollateralError(
                "collateral",
                f"no valid cached collateral for FMSPC {ext.fmspc.hex()}",
                hint="fetch it from a PCCS (--pccs) or pass --collateral",
            )
        col = fetch_intel_collateral(quote_bytes, fetch, base_url)
        self._store(name, col.to_json().encode())
        return col

    def cached_intel(self, quote_bytes: bytes, *, now: datetime) -> IntelCollateral | None:
        """The cached collateral for the quote's platform if valid at ``now``; never fetches."""
        tee, ext, ca = _platform(quote_bytes)
        return self._cached(f"intel-{tee}-{ext.fmspc.hex()}-{ca}.json", now)

    def _cached(self, name: str, now: datetime) -> IntelCollateral | None:
        path = self._path(name)
        if not path.exists():
            return None
        try:
            col = IntelCollateral.from_json(path.read_bytes())
        except (CollateralError, FormatError):
            return None  # a damaged cache entry is refetched
        return col if _intel_valid(col, now) else None

    def vcek(
        self, report_bytes: bytes, *, fetch: Fetcher | None = None, product: str | None = None
    ) -> tuple[bytes, list[x509.Certificate]]:
        report = SnpReport.from_bytes(report_bytes)
        name = f"vcek-{report.chip_id.hex()[:32]}-{report.reported_tcb:016x}"
        der, chain = self._path(name + ".der"), self._path(name + ".chain.pem")
        if der.exists() and chain.exists():
            return der.read_bytes(), load_pem_chain(chain.read_bytes(), "ASK/ARK chain")
        if fetch is None:
            raise CollateralError(
                "endorsement",
                "no cached VCEK for this chip and TCB",
                hint="pass --vcek, or allow fetching from AMD's KDS",
            )
        vcek, certs = fetch_vcek(report_bytes, fetch, product)
        Endorsement.from_certificate(load_certificate(vcek))
        self._store(name + ".der", vcek)
        self._store(name + ".chain.pem", b"".join(c.public_bytes(Encoding.PEM) for c in certs))
        return vcek, certs

    def amd_crl(
        self,
        product: str,
        ark: x509.Certificate,
        *,
        now: datetime,
        fetch: Fetcher | None = None,
        base_url: str = AMD_KDS_URL,
    ) -> x509.CertificateRevocationList | None:
        """AMD's CRL for ``product``: the cached one while it is signed by ``ark`` and current at
        ``now``, else fetched from KDS when ``fetch`` is given, else None. A fetched CRL is kept
        only when ``ark`` signed it; one that is not is returned all the same, so that the
        verifier refuses it and says why."""
        if product not in AMD_PRODUCTS:  # it becomes part of a URL and a file name
            raise CollateralError("revocation list", f"unknown AMD product {product!r}")
        name = f"amd-crl-{product}.der"
        path = self._path(name)
        if path.exists():
            try:
                cached = _certs.der_crl(path.read_bytes())
            except ValueError:
                cached = None  # a damaged cache entry is refetched
            if cached is not None and _crl_usable(cached, ark, now):
                return cached
        if fetch is None:
            return None
        body = fetch_amd_crl(product, fetch, base_url)
        crl = _certs.der_crl(body)
        if _crl_usable(crl, ark, now):
            self._store(name, body)
        return crl


def _crl_usable(
    crl: x509.CertificateRevocationList, issuer: x509.Certificate, now: datetime
) -> bool:
    """Signed by ``issuer`` and current at ``now`` (what is worth keeping in the cache)."""
    key = issuer.public_key()
    nxt = crl.next_update_utc
    return (
        crl.issuer == issuer.subject
        and isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        and crl.is_signature_valid(key)
        and crl.last_update_utc <= now
        and (nxt is None or now <= nxt)
    )


def _intel_valid(col: IntelCollateral, now: datetime) -> bool:
    try:
        tcb, qe = TcbInfo.from_json(col.tcb_info), EnclaveIdentity.from_json(col.qe_identity)
    except CollateralError:
        return False
    crls = (col.pck_crl, col.root_ca_crl)
    return (
        tcb.next_update > now
        and qe.next_update > now
        and all((c.next_update_utc or now) > now for c in crls)
    )


def pcs_response_json(member: str, raw: bytes, signature: bytes) -> bytes:
    """The body PCS serves for a signed member (used by tests that emulate PCS)."""
    return (
        b'{"'
        + member.encode()
        + b'":'
        + raw
        + b',"signature":'
        + json.dumps(signature.hex()).encode()
        + b"}"
    )
