"""A Python client for the broker (httpx), used by the runner and the CLI.

TLS is pinned: give the broker's certificate fingerprint (SHA-256 of its DER) and the client trusts
exactly that certificate, checked during the handshake, before any request (or token) is sent.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any

import httpx

from shieldml.broker import protocol, tlog
from shieldml.broker.audit import AuditProof
from shieldml.broker.tls import pinned_context
from shieldml.errors import (
    AuditChainError,
    BindingError,
    BrokerError,
    BrokerUnavailable,
    FormatError,
    KeyExistsError,
    NonceError,
    NotGenuineError,
    ReleaseDenied,
    UnknownKeyError,
)


def _error(status: int, detail: Any, path: str) -> BrokerError:
    """The error class a caller can tell apart, from the broker's status and answer."""
    reason = detail.get("reason") if isinstance(detail, dict) else None
    if status == 403 and isinstance(detail, dict) and "verdicts" in detail:
        verdicts = detail["verdicts"] if isinstance(detail["verdicts"], dict) else {}
        return ReleaseDenied(
            status,
            detail,
            verdicts=[
                {"key": k, **v} if isinstance(v, dict) else {"key": k} for k, v in verdicts.items()
            ],
        )
    if status == 403 and isinstance(reason, str) and reason.startswith("report data does not bind"):
        return BindingError(status, detail)
    if status == 403 and reason in (protocol.NOT_GENUINE, protocol.GPU_NOT_GENUINE):
        return NotGenuineError(status, detail)
    if status == 409 and path == "/v1/release":
        return NonceError(
            status, detail, hint="ask the broker for a new challenge (a run does so itself)"
        )
    if status == 409:
        return KeyExistsError(status, detail, hint="--replace rotates an existing key")
    if (status == 404 and path in ("/v1/release",)) or (status == 404 and "/keys/" in path):
        return UnknownKeyError(status, detail)
    if status == 503:
        return BrokerUnavailable(status, detail)
    return BrokerError(status, detail)


def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise FormatError(f"{what}: not an integer in the release answer")
    return v


@dataclass
class ReleasedKeys:
    keys: dict[str, tuple[str, bytes]]  # name -> (format, key)
    audit_seq: int
    tee: str
    #: the release's audit record, its inclusion proof and the signed checkpoint it verifies
    #: against (None from a broker that predates the tree)
    audit_proof: AuditProof | None = None
    #: each GPU the broker verified with the CPU evidence (identity and versions, as it says)
    gpus: tuple[dict[str, Any], ...] = ()


#: what a release answer says of each GPU it verified (GpuClaims.summary), and bounds on it
GPU_SUMMARY_FIELDS = frozenset(
    [
        "arch",
        "ueid",
        "hwmodel",
        "driver_version",
        "vbios_version",
        "cc_mode",
        "root",
        "rim_ids",
        "rim_kinds",
        "measurements_matched",
    ]
)
MAX_GPU_FIELD = 256
MAX_RIM_IDS = 8


def _verified_gpus(
    url: str, listed: Any, sent: list[dict[str, Any]], proof: AuditProof | None
) -> tuple[dict[str, Any], ...]:
    """The answer's ``gpus``, checked before the runner writes them into a receipt: one per GPU
    sent, in order, each naming the serial (``ueid``) of the chain sent at its place, with only
    a summary's fields (short printable strings); equal to the release's audit record where the
    answer carries its proof. A broker cannot name GPUs that were not sent, nor smuggle data."""
    from cryptography import x509  # not shieldml.attest: the client sits below it

    def refuse(why: str) -> BrokerError:
        return BrokerError(None, f"{url}: the release's GPU list {why}; nothing was used")

    def text(v: Any) -> bool:
        return isinstance(v, str) and len(v) <= MAX_GPU_FIELD and v.isascii() and v.isprintable()

    if not isinstance(listed, list) or len(listed) != len(sent):
        raise refuse(f"does not name the {len(sent)} GPU(s) sent")
    out = []
    for i, (g, mine) in enumerate(zip(listed, sent, strict=True)):
        if not isinstance(g, dict) or set(g) != GPU_SUMMARY_FIELDS:
            raise refuse(f"has a GPU {i} record with other fields than a GPU summary's")
        for name, label in (("rim_ids", "RIM ids"), ("rim_kinds", "RIM kinds")):
            ids = g[name]
            if not isinstance(ids, list) or len(ids) > MAX_RIM_IDS or not all(map(text, ids)):
                raise refuse(f"has malformed {label} for GPU {i}")
        if not isinstance(g["measurements_matched"], bool):
            raise refuse(f"has a malformed measurements_matched for GPU {i}")
        lists = ("rim_ids", "rim_kinds", "measurements_matched")
        others = [v for k, v in g.items() if k not in lists]
        if not all(v is None or text(v) for v in others):
            raise refuse(f"has a malformed field for GPU {i}")
        pem = mine.get("certificate")
        serial = None
        if isinstance(pem, str):  # the chain sent at this place: its leaf (first) is the GPU
            try:
                serial = str(x509.load_pem_x509_certificates(pem.encode())[0].serial_number)
            except (ValueError, IndexError):
                serial = None
        if serial is None or g["ueid"] != serial:
            raise refuse(f"names another GPU {i} than the one whose evidence was sent")
        out.append(dict(g))
    if proof is not None and proof.data.get("gpus", []) != out:
        raise refuse("differs from the GPUs in the release's audit record")
    return tuple(out)


class BrokerClient:
    def __init__(
        self,
        url: str,
        *,
        fingerprint: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        log_key: tlog.NoteVerifier | None = None,
    ) -> None:
        """``log_key``: the broker's audit-log verifier key; with it, a release answer must carry
        an audit proof whose checkpoint that key signed."""
        self.url = url.rstrip("/")
        self.log_key = log_key
        verify: ssl.SSLContext | bool = True
        if transport is None and self.url.startswith("https://") and fingerprint:
            verify = pinned_context(self.url, fingerprint)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=self.url, verify=verify, timeout=timeout, headers=headers, transport=transport
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise BrokerUnavailable(None, f"{self.url}{path}: {e}") from e
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise _error(r.status_code, detail, path)
        return r.json()

    # -- runner side ----------------------------------------------------------------------------
    def challenge(self) -> bytes:
        return bytes.fromhex(self._call("POST", "/v1/challenge")["nonce"])

    def release(
        self,
        nonce: bytes,
        runner_key: protocol.RunnerKey,
        workload_digest: str,
        keys: list[str],
        evidence: bytes,
        *,
        tee: str = "auto",
        collateral: dict[str, Any] | None = None,
        vcek: bytes | None = None,
        cert_chain: str | None = None,
        amd_crl: bytes | None = None,
        gpus: list[dict[str, Any]] | None = None,
    ) -> ReleasedKeys:
        """``gpus``: each GPU's evidence (:meth:`shieldml.runner.gpu.GpuEvidenceItem.to_dict`),
        bound to this release by :func:`shieldml.broker.protocol.gpu_nonce`."""
        body: dict[str, Any] = {
            "nonce": nonce.hex(),
            "tee": tee,
            "evidence": base64.b64encode(evidence).decode(),
            "hpke_kem": runner_key.kem,
            "hpke_public_key": base64.b64encode(runner_key.public_bytes).decode(),
            "workload_digest": workload_digest,
            "keys": keys,
        }
        if collateral is not None:
            body["collateral"] = collateral
        if vcek is not None:
            body["vcek"] = base64.b64encode(vcek).decode()
        if cert_chain is not None:
            body["cert_chain"] = cert_chain
        if amd_crl is not None:
            body["amd_crl"] = base64.b64encode(amd_crl).decode()
        if gpus:
            body["gpus"] = gpus
        doc = self._call("POST", "/v1/release", json=body)
        opened = self._opened(doc.get("keys"), keys, runner_key)
        seq = _int(doc.get("audit_seq"), f"{self.url}: audit_seq")
        proof = self._audit_proof(doc.get("audit_log"), seq, nonce, workload_digest, keys)
        listed = _verified_gpus(self.url, doc.get("gpus", []), gpus or [], proof)
        return ReleasedKeys(opened, seq, str(doc.get("tee", "")), proof, listed)

    def _audit_proof(
        self, answer: Any, seq: int, nonce: bytes, workload_digest: str, keys: list[str]
    ) -> AuditProof | None:
        """The answer's audit proof, checked: it is this release's record (its sequence number,
        nonce hash, workload digest and key names, allowed) and it is in the checkpoint's tree
        (signed by ``log_key`` when one is set). A broker that sends none is accepted only
        without ``log_key``."""
        if answer is None:
            if self.log_key is not None:
                raise AuditChainError(f"{self.url}: the release answer carries no audit proof")
            return None
        proof = AuditProof.from_dict(answer)
        d = proof.data
        if not (
            proof.seq == seq
            and proof.event == "release"
            and d.get("allowed") is True
            and d.get("nonce_sha256") == hashlib.sha256(nonce).hexdigest()
            and d.get("workload_digest") == workload_digest
            and d.get("keys") == list(dict.fromkeys(keys))
        ):
            raise AuditChainError(
                f"{self.url}: the audit record in the release answer is not this release's",
                seq=proof.seq,
            )
        proof.verify([self.log_key] if self.log_key is not None else None)
        return proof

    def _opened(
        self, answer: Any, asked: list[str], runner_key: protocol.RunnerKey
    ) -> dict[str, tuple[str, bytes]]:
        """The keys of a release answer, opened; exactly the names asked for, or a refusal.

        A broker may answer only for itself: a name it was not asked for (another owner's key
        name, say ``model`` from the data owner's broker) would otherwise replace that owner's key.
        """
        if not isinstance(answer, dict):
            raise FormatError(f"{self.url}: the release answer has no keys")
        extra = sorted(set(answer) - set(asked))
        missing = sorted(set(asked) - set(answer))
        if extra or missing:
            raise BrokerError(
                None,
                f"{self.url}: the release answer does not match the request"
                + (f"; keys not asked for: {', '.join(map(repr, extra))}" if extra else "")
                + (f"; keys missing: {', '.join(map(repr, missing))}" if missing else ""),
                hint="a broker answers only for the keys the job names for it; nothing was used",
            )
        out: dict[str, tuple[str, bytes]] = {}
        for name in asked:
            k = answer[name]
            if not isinstance(k, dict) or not isinstance(k.get("format"), str):
                raise FormatError(f"{self.url}: key {name!r}: malformed release answer")
            try:
                sealed = base64.b64decode(str(k.get("sealed", "")), validate=True)
            except ValueError as e:
                raise FormatError(f"{self.url}: key {name!r}: sealed value is not base64") from e
            out[name] = (k["format"], runner_key.open(name, sealed))
        return out

    # -- admin side -----------------------------------------------------------------------------
    def add_key(
        self, name: str, fmt: str = "stream", key: bytes | None = None, *, replace: bool = False
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "format": fmt, "replace": replace}
        if key is not None:
            body["key"] = base64.b64encode(key).decode()
        return dict(self._call("POST", "/v1/admin/keys", json=body))

    def list_keys(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/admin/keys"))

    def set_policy(self, name: str, toml: str) -> dict[str, Any]:
        return dict(
            self._call(
                "PUT", f"/v1/admin/keys/{urllib.parse.quote(name)}/policy", json={"toml": toml}
            )
        )

    def get_policy(self, name: str) -> dict[str, Any]:
        """``{"name", "sha256", "updated_at", "toml"}`` of key ``name``'s policy."""
        return dict(self._call("GET", f"/v1/admin/keys/{urllib.parse.quote(name)}/policy"))

    def list_policies(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/admin/policies"))

    def delete_policy(self, name: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/v1/admin/keys/{urllib.parse.quote(name)}/policy"))

    def delete_key(self, name: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/v1/admin/keys/{urllib.parse.quote(name)}"))

    def audit(self, after: int = 0, limit: int = 1000) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/admin/audit", params={"after": after, "limit": limit}))

    def audit_checkpoint(self) -> dict[str, str]:
        """``{"checkpoint": signed note, "verifier_key": the key the broker says it signs with}``."""
        doc = self._call("GET", "/v1/audit/checkpoint")
        if not isinstance(doc, dict) or not all(
            isinstance(doc.get(k), str) for k in ("checkpoint", "verifier_key")
        ):
            raise FormatError(f"{self.url}: malformed checkpoint answer")
        return {"checkpoint": doc["checkpoint"], "verifier_key": doc["verifier_key"]}

    def audit_consistency(self, first: int, second: int) -> list[bytes]:
        doc = self._call(
            "GET", "/v1/admin/audit/consistency", params={"first": first, "second": second}
        )
        try:
            return [base64.b64decode(h, validate=True) for h in doc["proof"]]
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{self.url}: malformed consistency proof: {e}") from None

    def audit_all(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        records: list[dict[str, Any]] = []
        head: dict[str, Any] = {}
        while True:
            doc = self.audit(after=records[-1]["seq"] if records else 0, limit=5000)
            head = doc["head"]
            records += doc["records"]
            if not doc["records"] or records[-1]["seq"] >= head["seq"]:
                return records, head
