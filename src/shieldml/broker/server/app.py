"""The key broker's HTTP API (FastAPI): challenge, release, and bearer-token admin endpoints.

The release decision is :func:`shieldml.broker.server.release.decide` (also used by Gramine
secret provisioning); this module maps its refusals to answers, keeping their statuses and JSON
``detail`` shapes: 409 nonce (a string), 403 not genuine ``{"reason", "reasons", "check",
"message", "expected", "found", "hint", "checks", "audit_seq"}``, 403 binding ``{"reason", "expected", "found", "audit_seq"}``, 404 unknown key ``{"reason",
"audit_seq"}``, 403 policy ``{"reason", "verdicts", "audit_seq"}``. Endpoints that touch the
database, verify evidence or may wait on a PCCS are plain ``def``: FastAPI runs them in its
worker threads, so one slow release never holds the event loop (``/v1/health`` answers meanwhile).
``/v1/challenge`` is rate-limited per client address (token bucket per worker process): 429.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any, Literal

import sqlalchemy.exc
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shieldml import __version__
from shieldml.broker import protocol
from shieldml.broker.server.metrics import CONTENT_TYPE, AccessLog, BrokerMetrics
from shieldml.broker.server.release import (
    BODY_TIMEOUT,
    MAX_BODY,
    MAX_KEYS_PER_RELEASE,
    GpuBundle,
    NonceBinding,
    Released,
    ReleaseRequest,
    Settings,
    decide,
)
from shieldml.broker.server.storage import KEY_NAME_PATTERN, NAME_MAX, Store
from shieldml.errors import (
    AuditChainError,
    BrokerError,
    FormatError,
    IntegrityError,
    PolicyError,
    ShieldError,
)
from shieldml.files import Format, generate_key
from shieldml.policy import Policy

__all__ = [
    "BODY_TIMEOUT",
    "MAX_BODY",
    "MAX_KEYS_PER_RELEASE",
    "BodyLimit",
    "ChallengeLimiter",
    "Settings",
    "create_app",
]

log = logging.getLogger("shieldml.broker")
MAX_CLIENTS_TRACKED = 65536  # addresses whose challenge budget a worker remembers (LRU)

KeyName = Annotated[str, Field(min_length=1, max_length=NAME_MAX, pattern=KEY_NAME_PATTERN)]


class ChallengeResponse(BaseModel):
    nonce: str = Field(description="32 random bytes, hex; single use")
    expires_at: str


class GpuBody(BaseModel):
    """One NVIDIA GPU's evidence (in the order the runner enumerated the GPUs)."""

    cc_mode: Literal["on", "off", "devtools"] = Field(
        description="the CC mode the runner read through NVML; part of the GPU's nonce"
    )
    evidence: str | None = Field(
        default=None,
        description="base64 SPDM request+response (none: not in CC mode)",
        max_length=64_000,
    )
    certificate: str | None = Field(
        default=None,
        description="the device certificate chain (PEM, leaf first)",
        max_length=64_000,
    )
    ocsp: list[str] = Field(
        default_factory=list, description="base64 DER OCSP responses", max_length=32
    )
    rims: list[str] = Field(
        default_factory=list, description="driver and VBIOS RIMs (SWID XML)", max_length=4
    )


class ReleaseBody(BaseModel):
    nonce: str = Field(pattern="^[0-9a-f]{64}$")
    tee: Literal["auto", "sgx", "tdx", "snp", "ratls"] = "auto"
    evidence: str = Field(
        description="base64 quote, report or RA-TLS certificate", max_length=200_000
    )
    collateral: dict[str, str] | None = Field(default=None, description="Intel collateral JSON")
    vcek: str | None = Field(
        default=None, description="base64 VCEK/VLEK or SNP certificate table", max_length=100_000
    )
    cert_chain: str | None = Field(
        default=None, description="PEM ASK/ARK chain", max_length=100_000
    )
    amd_crl: str | None = Field(
        default=None,
        description="base64 AMD CRL (KDS /vcek/v1/PRODUCT/crl, DER); SEV-SNP revocation is checked"
        " only with it",
        max_length=200_000,
    )
    hpke_kem: Literal["X25519", "MLKEM768-X25519"] = "X25519"
    hpke_public_key: str = Field(description="base64", max_length=4096)
    workload_digest: str = Field(pattern="^sha256:[0-9a-f]{64}$")
    keys: list[KeyName] = Field(min_length=1, max_length=MAX_KEYS_PER_RELEASE)
    gpus: list[GpuBody] = Field(
        default_factory=list,
        max_length=protocol.MAX_GPUS,
        description="NVIDIA GPU evidence, bound to this session by gpu_nonce",
    )


class SealedKey(BaseModel):
    format: str
    sealed: str = Field(description="base64 HPKE enc || ciphertext")


class AuditRecordOut(BaseModel):
    seq: int
    at: str
    event: str
    data: dict[str, Any]


class AuditLogProof(BaseModel):
    """The release's own audit record, its RFC 9162 inclusion proof (leaf ``seq - 1``) and the
    signed checkpoint (C2SP, a signed note) of the tree of ``tree_size = seq`` records."""

    record: AuditRecordOut
    leaf_index: int
    tree_size: int
    inclusion: list[str] = Field(description="base64 SHA-256 hashes, innermost first")
    checkpoint: str


class ReleaseResponse(BaseModel):
    keys: dict[str, SealedKey]
    audit_seq: int
    tee: str
    tcb_status: str | None
    audit_log: AuditLogProof | None = None
    gpus: list[dict[str, Any]] = Field(
        default_factory=list,
        description="each GPU verified with the CPU evidence: identity and versions",
    )


class CheckpointResponse(BaseModel):
    checkpoint: str = Field(description="C2SP tlog-checkpoint, signed (C2SP signed-note)")
    verifier_key: str = Field(description="the log's signed-note verifier key")


class ConsistencyResponse(BaseModel):
    first: int
    second: int
    proof: list[str] = Field(description="RFC 9162 consistency proof, base64 hashes")


class KeyIn(BaseModel):
    name: KeyName
    format: Literal["stream", "gramine-pf"] = "stream"
    key: str | None = Field(default=None, description="base64 raw key; generated when absent")
    replace: bool = False


class PolicyIn(BaseModel):
    toml: str = Field(max_length=256 * 1024)


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, f"{what} is not valid base64") from None


class ChallengeLimiter:
    """A token bucket per client address: ``rate`` challenges a second sustained, ``burst`` at
    once. In memory, per worker process; at most ``max_clients`` addresses remembered (the least
    recently seen is forgotten first, which gives it a full bucket again). Thread-safe."""

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Callable[[], float],
        max_clients: int = MAX_CLIENTS_TRACKED,
    ) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """0 if ``client`` may have a challenge now (one token taken), else seconds to wait."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[client] = (tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait


def create_app(store: Store, settings: Settings | None = None) -> FastAPI:
    cfg = settings or Settings()
    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN (blank offline, and a
    # third-party script on the broker's origin); the schema is at /openapi.json.
    app = FastAPI(
        title="shieldml key broker",
        version=__version__,
        description=__doc__,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, max_body=cfg.max_body, timeout=cfg.body_timeout)
    metrics = BrokerMetrics(store.nonce_count)
    app.add_middleware(AccessLog, metrics=metrics)  # outermost: times the whole request
    limiter = ChallengeLimiter(cfg.challenge_rate, cfg.challenge_burst, cfg.monotonic)

    @app.exception_handler(sqlalchemy.exc.DBAPIError)
    async def database_down(_request: Request, exc: sqlalchemy.exc.DBAPIError) -> JSONResponse:
        log.warning("database error: %s", type(exc.orig).__name__ if exc.orig else exc)
        return JSONResponse(
            {"detail": "the broker's database is unavailable; retry"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(ShieldError)
    async def shield_error(_request: Request, exc: ShieldError) -> JSONResponse:
        status = exc.status if isinstance(exc, BrokerError) and exc.status else 400
        # the broker's own rows failed authentication (an audit log that does not verify keeps
        # its 400: `audit verify` reports it as the log's state, not as a broker fault)
        if isinstance(exc, IntegrityError) and not isinstance(exc, AuditChainError):
            log.error("integrity: %s", exc.message)
            status = 500
        detail = exc.detail if isinstance(exc, BrokerError) else exc.diagnostics()
        return JSONResponse({"detail": detail}, status_code=status)

    def admin(authorization: str = Header(default="")) -> None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token or not store.check_admin_token(token):
            raise HTTPException(
                401,
                "admin operations need the broker's bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.post("/v1/challenge", response_model=ChallengeResponse, responses={429: {}})
    def challenge(request: Request) -> ChallengeResponse:
        client = request.client.host if request.client else "unknown"
        wait = limiter.take(client)
        if wait > 0:
            raise HTTPException(
                429,
                f"too many challenges from {client}: at most {cfg.challenge_rate:g} a second "
                f"(bursts of {cfg.challenge_burst:g}) per address; retry in {wait:.2f} s",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        nonce, expires = store.new_nonce(cfg.nonce_ttl, audit=("challenge", {}))
        return ChallengeResponse(nonce=nonce.hex(), expires_at=expires.isoformat())

    @app.post("/v1/release", response_model=ReleaseResponse, responses={403: {}, 404: {}, 409: {}})
    def release(req: ReleaseBody) -> ReleaseResponse:
        evidence = _b64(req.evidence, "evidence")
        pk = _b64(req.hpke_public_key, "hpke_public_key")
        vcek = _b64(req.vcek, "vcek") if req.vcek else None
        amd_crl = _b64(req.amd_crl, "amd_crl") if req.amd_crl else None
        kem_id = protocol.KEMS[req.hpke_kem]
        nonce = bytes.fromhex(req.nonce)
        try:
            protocol.load_public_key(kem_id, pk)
            expected = protocol.report_data(nonce, kem_id, pk, req.workload_digest)
        except FormatError as e:
            raise HTTPException(400, e.message) from None
        released = _decide_counted(
            metrics,
            store,
            cfg,
            ReleaseRequest(
                evidence=evidence,
                keys=req.keys,
                binding=NonceBinding(nonce, expected, req.workload_digest),
                tee=req.tee,
                collateral=req.collateral,
                vcek=vcek,
                cert_chain=req.cert_chain,
                amd_crl=amd_crl,
                gpus=[
                    GpuBundle(
                        g.cc_mode,
                        _b64(g.evidence, "gpus.evidence") if g.evidence else None,
                        g.certificate.encode() if g.certificate else None,
                        [_b64(o, "gpus.ocsp") for o in g.ocsp],
                        [r.encode() for r in g.rims],
                    )
                    for g in req.gpus
                ],
            ),
        )  # raises the refusal; the ShieldError handler answers its status and detail
        claims = released.claims
        proof = released.audit_proof
        return ReleaseResponse(
            keys={
                n: SealedKey(
                    format=fmt, sealed=base64.b64encode(protocol.seal(kem_id, pk, n, s)).decode()
                )
                for n, (fmt, s) in released.keys.items()
            },
            audit_seq=released.audit_seq,
            tee=claims.tee.value,
            tcb_status=claims.tcb_status.value if claims.tcb_status else None,
            audit_log=AuditLogProof.model_validate(proof.to_dict()) if proof else None,
            gpus=[g.summary() for g in released.gpus],
        )

    @app.post("/v1/admin/keys", dependencies=[Depends(admin)], status_code=201)
    def add_key(body: KeyIn) -> dict[str, Any]:
        fmt = Format(body.format)
        secret = _b64(body.key, "key") if body.key else generate_key(fmt)
        if len(secret) != fmt.key_size:
            raise HTTPException(400, f"a {fmt} key has {fmt.key_size} bytes, not {len(secret)}")
        store.put_key(body.name, fmt.value, secret, replace=body.replace)
        seq = store.audit(
            "key_added",
            {
                "name": body.name,
                "format": fmt.value,
                "generated": body.key is None,
                "replaced": body.replace,
            },
        )
        return {"name": body.name, "format": fmt.value, "audit_seq": seq}

    @app.get("/v1/admin/keys", dependencies=[Depends(admin)])
    def list_keys() -> list[dict[str, Any]]:
        return store.list_keys()

    @app.put("/v1/admin/keys/{name}/policy", dependencies=[Depends(admin)])
    def set_policy(name: str, body: PolicyIn) -> dict[str, Any]:
        try:
            pol = Policy.from_toml(body.toml, f"policy of {name}")
        except PolicyError as e:
            raise HTTPException(400, e.diagnostics()) from None
        # the policy and its record in one transaction: the log's last policy_set of a key is
        # the policy in force, whichever of two admins (or replicas) committed last
        seq = store.set_policy(
            name,
            body.toml,
            audit={
                "name": name,
                "profiles": len(pol.profiles),
                "sha256": protocol_hash(body.toml.encode()),
            },
        )
        return {"name": name, "profiles": len(pol.profiles), "audit_seq": seq}

    @app.get("/v1/admin/audit", dependencies=[Depends(admin)])
    def audit(
        after: int = Query(0, ge=0, le=2**62), limit: int = Query(1000, ge=1, le=10_000)
    ) -> dict[str, Any]:
        records = store.audit_records(after, limit)
        head = store.audit_head()
        return {"head": head.to_dict(), "records": [r.to_dict() for r in records]}

    @app.get("/v1/admin/keys/{name}/policy", dependencies=[Depends(admin)])
    def get_policy(name: str) -> dict[str, Any]:
        doc = store.policy_info(name)
        if doc is None:
            raise HTTPException(404, f"key {name!r} has no policy (its releases are denied)")
        return doc

    @app.delete("/v1/admin/keys/{name}/policy", dependencies=[Depends(admin)])
    def delete_policy(name: str) -> dict[str, Any]:
        digest, seq = store.delete_policy(name, audit=True)  # with its record, as set_policy
        return {"name": name, "sha256": digest, "audit_seq": seq}

    @app.get("/v1/admin/policies", dependencies=[Depends(admin)])
    def list_policies() -> list[dict[str, Any]]:
        return store.list_policies()

    @app.delete("/v1/admin/keys/{name}", dependencies=[Depends(admin)])
    def delete_key(name: str) -> dict[str, Any]:
        had_policy, seq = store.delete_key(name, audit=True)  # with its record, as set_policy
        return {"name": name, "had_policy": had_policy, "audit_seq": seq}

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/admin/audit/consistency", dependencies=[Depends(admin)])
    def audit_consistency(
        first: int = Query(ge=0, le=2**62), second: int = Query(ge=0, le=2**62)
    ) -> ConsistencyResponse:
        proof = store.audit_consistency(first, second)
        return ConsistencyResponse(
            first=first, second=second, proof=[base64.b64encode(h).decode() for h in proof]
        )

    @app.get("/v1/audit/checkpoint")
    def audit_checkpoint() -> CheckpointResponse:
        """The log's latest signed checkpoint: public, to be published and compared anywhere (it
        tells the number of audit records and nothing else)."""
        return CheckpointResponse(
            checkpoint=store.audit_checkpoint(), verifier_key=store.log_signer.verifier.vkey()
        )

    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    return app


def _decide_counted(
    metrics: BrokerMetrics, store: Store, cfg: Settings, request: ReleaseRequest
) -> Released:
    """:func:`decide`, counted in the metrics; a refusal also gets its access-log line."""
    try:
        released = decide(store, cfg, request)
    except ShieldError as e:
        detail = e.detail if isinstance(e, BrokerError) else None
        metrics.denied(e, detail.get("audit_seq") if isinstance(detail, dict) else None)
        raise
    metrics.allowed()
    return released


class BodyLimit:
    """Pure ASGI middleware: 413 for bodies over ``max_body``, declared or streamed; 408 for a
    body not received in full within ``timeout`` seconds of the first read (slow-body clients)."""

    def __init__(self, app: ASGIApp, max_body: int, timeout: float = BODY_TIMEOUT) -> None:
        self.app = app
        self.max_body = max_body
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        close = {"Connection": "close"}  # the rest of the body is never read
        too_large = f"request body larger than {self.max_body} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await JSONResponse({"detail": too_large}, 413, close)(scope, receive, send)
            return
        seen = 0
        deadline: float | None = None

        async def counted() -> Message:
            nonlocal seen, deadline
            deadline = deadline or asyncio.get_running_loop().time() + self.timeout
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                msg = f"request body not received within {self.timeout:g} s"
                raise HTTPException(408, msg, headers=close) from None
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise HTTPException(413, too_large, headers=close)
            return message

        await self.app(scope, counted, send)


def protocol_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
