"""The key broker's HTTP API (FastAPI): challenge, release, and bearer-token admin endpoints.

Release pipeline (each step audited, no key material ever in the log):
 1. consume the nonce (single use, unexpired; one conditional UPDATE)          409
 2. verify the evidence: genuine hardware, chain to a trusted root, TCB level   403 + reasons
 3. REPORTDATA == binding(nonce, HPKE key, workload digest)                     403
 4. every requested key exists and has a policy that accepts the Claims          404 / 403 + verdicts
 5. seal each key to the runner's HPKE key                                      200
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy.exc
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shieldml import __version__
from shieldml.attest import (
    Claims,
    IntelCollateral,
    TrustAnchors,
    VerificationCache,
    detect_tee,
    extract,
    load_pem_chain,
    verify_evidence,
)
from shieldml.broker import protocol
from shieldml.broker.server.storage import Store
from shieldml.errors import AttestationError, BrokerError, FormatError, PolicyError, ShieldError
from shieldml.files import Format, generate_key
from shieldml.policy import Policy, Verdict, evaluate

log = logging.getLogger("shieldml.broker")
MAX_BODY = 1 << 20
BODY_TIMEOUT = 10.0
MAX_KEYS_PER_RELEASE = 32


@dataclass
class Settings:
    nonce_ttl: timedelta = timedelta(seconds=60)
    trust: TrustAnchors = field(default_factory=TrustAnchors)
    max_body: int = MAX_BODY
    #: seconds a client has to send a whole request body (slow-body clients get 408)
    body_timeout: float = BODY_TIMEOUT
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    cache: VerificationCache = field(default_factory=VerificationCache)
    #: collateral for a DCAP quote the runner sent without it (e.g. from a PCCS cache)
    collateral_for: Callable[[bytes], IntelCollateral] | None = None


class ChallengeResponse(BaseModel):
    nonce: str = Field(description="32 random bytes, hex; single use")
    expires_at: str


class ReleaseRequest(BaseModel):
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
    hpke_kem: Literal["X25519", "MLKEM768-X25519"] = "X25519"
    hpke_public_key: str = Field(description="base64", max_length=4096)
    workload_digest: str = Field(pattern="^sha256:[0-9a-f]{64}$")
    keys: list[str] = Field(min_length=1, max_length=MAX_KEYS_PER_RELEASE)


class SealedKey(BaseModel):
    format: str
    sealed: str = Field(description="base64 HPKE enc || ciphertext")


class ReleaseResponse(BaseModel):
    keys: dict[str, SealedKey]
    audit_seq: int
    tee: str
    tcb_status: str | None


class KeyIn(BaseModel):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
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


def create_app(store: Store, settings: Settings | None = None) -> FastAPI:
    cfg = settings or Settings()
    app = FastAPI(title="shieldml key broker", version=__version__, description=__doc__)
    app.add_middleware(BodyLimit, max_body=cfg.max_body, timeout=cfg.body_timeout)

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

    @app.post("/v1/challenge", response_model=ChallengeResponse)
    async def challenge() -> ChallengeResponse:
        nonce, expires = store.new_nonce(cfg.nonce_ttl, audit=("challenge", {}))
        return ChallengeResponse(nonce=nonce.hex(), expires_at=expires.isoformat())

    @app.post("/v1/release", response_model=ReleaseResponse, responses={403: {}, 404: {}, 409: {}})
    async def release(req: ReleaseRequest) -> ReleaseResponse:
        nonce = bytes.fromhex(req.nonce)
        base = {
            "nonce_sha256": protocol_hash(nonce),
            "keys": req.keys,
            "workload_digest": req.workload_digest,
        }
        evidence = _b64(req.evidence, "evidence")
        pk = _b64(req.hpke_public_key, "hpke_public_key")
        kem_id = protocol.KEMS[req.hpke_kem]
        try:
            protocol.load_public_key(kem_id, pk)
        except FormatError as e:
            raise HTTPException(400, e.message) from None
        if not store.consume_nonce(nonce):  # 1
            store.audit(
                "release",
                {**base, "allowed": False, "reason": "nonce unknown, expired or already used"},
            )
            raise HTTPException(
                409, "nonce unknown, expired or already used: ask /v1/challenge for a new one"
            )
        try:  # 2
            claims = verify_evidence(
                evidence, tee=req.tee, collateral=_collateral(req.collateral) or _lookup(cfg, evidence, req.tee),
                vcek=_b64(req.vcek, "vcek") if req.vcek else None,
                cert_chain=load_pem_chain(req.cert_chain, "cert_chain") if req.cert_chain else None,
                now=cfg.now(), trust=cfg.trust, cache=cfg.cache,
            )  # fmt: skip
        except (AttestationError, FormatError) as e:
            seq = store.audit("release", {**base, "allowed": False, "reason": e.diagnostics()})
            raise HTTPException(
                403,
                {
                    "reason": "evidence is not genuine",
                    "reasons": [e.diagnostics()],
                    "audit_seq": seq,
                },
            ) from None
        try:  # 3
            expected = protocol.report_data(nonce, kem_id, pk, req.workload_digest)
        except FormatError as e:
            raise HTTPException(400, e.message) from None
        if not protocol.binding_matches(expected, claims.report_data):
            seq = store.audit(
                "release",
                {
                    **base,
                    "allowed": False,
                    "tee": claims.tee.value,
                    "reason": "report data does not bind nonce, HPKE key and workload digest",
                },
            )
            raise HTTPException(
                403,
                {
                    "reason": "report data does not bind the nonce, HPKE key and workload digest",
                    "expected": expected.hex(),
                    "found": claims.report_data.hex(),
                    "audit_seq": seq,
                },
            )
        verdicts: dict[str, Verdict] = {}  # 4
        denied: dict[str, Any] = {}
        secrets_: dict[str, tuple[str, bytes]] = {}
        for name in dict.fromkeys(req.keys):
            entry = store.key_with_policy(name)
            if entry is None:
                seq = store.audit(
                    "release",
                    {
                        **base,
                        "allowed": False,
                        "tee": claims.tee.value,
                        "reason": f"unknown key {name}",
                    },
                )
                raise HTTPException(404, {"reason": f"unknown key {name!r}", "audit_seq": seq})
            fmt, secret, text = entry
            if text is None:
                denied[name] = {"reason": "no policy set for this key: denied by default"}
                continue
            verdicts[name] = v = evaluate(_parse_policy(text, name), claims, req.workload_digest)
            if not v.allowed:
                denied[name] = v.to_dict()
            secrets_[name] = (fmt, secret)
        summary = _claims_summary(claims)
        if denied:
            seq = store.audit(
                "release",
                {
                    **base,
                    "allowed": False,
                    **summary,
                    "denied": sorted(denied),
                    "reasons": [f for v in verdicts.values() for f in v.failures()],
                },
            )
            raise HTTPException(
                403, {"reason": "policy denied", "verdicts": denied, "audit_seq": seq}
            )
        sealed = {
            n: SealedKey(
                format=fmt, sealed=base64.b64encode(protocol.seal(kem_id, pk, n, s)).decode()
            )
            for n, (fmt, s) in secrets_.items()
        }  # 5
        seq = store.audit(
            "release",
            {
                **base,
                "allowed": True,
                **summary,
                "matched_profiles": {n: v.matched for n, v in verdicts.items()},
            },
        )
        return ReleaseResponse(
            keys=sealed,
            audit_seq=seq,
            tee=claims.tee.value,
            tcb_status=claims.tcb_status.value if claims.tcb_status else None,
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
        store.set_policy(name, body.toml)
        seq = store.audit(
            "policy_set",
            {
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

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    return app


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


@functools.lru_cache(maxsize=256)
def _parse_policy(text: str, name: str) -> Policy:
    """Policies are re-read from the store on every release, so replicas see changes at once;
    parsing the same text again is what this cache saves."""
    return Policy.from_toml(text, f"policy of {name}")


def protocol_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _lookup(cfg: Settings, evidence: bytes, tee: str) -> IntelCollateral | None:
    """The broker's own collateral source, for Intel evidence that came without collateral."""
    if cfg.collateral_for is None:
        return None
    kind = detect_tee(evidence) if tee == "auto" else tee
    if kind == "snp":
        return None
    return cfg.collateral_for(extract(evidence).quote if kind == "ratls" else evidence)


def _collateral(doc: dict[str, str] | None) -> IntelCollateral | None:
    if doc is None:
        return None
    return IntelCollateral.from_json(json.dumps(doc))


def _claims_summary(c: Claims) -> dict[str, Any]:
    m = c.measurements.to_dict()
    keep = ("mrenclave", "mrsigner", "mrtd", "measurement", "isv_svn", "host_data")
    return {
        "tee": c.tee.value,
        "tcb_status": c.tcb_status.value if c.tcb_status else None,
        "advisory_ids": list(c.advisory_ids),
        "debug": c.debug,
        "root": c.root.value,
        "measurements": {k: v for k, v in m.items() if k in keep},
    }
