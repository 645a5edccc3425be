"""The release decision, written once: :func:`decide` for ``/v1/release`` and Gramine secret
provisioning alike.

Steps, each refusal its own error with the HTTP status the service answers; exactly one audit
record per decision, written here and nowhere else; no key material in it:

 1. every requested name follows the key-name rule, at most MAX_KEYS_PER_RELEASE   400
 2. consume the nonce (single use, unexpired; one conditional UPDATE)    NonceError 409
    (the requested keys' rows are read in the same transaction, and looked at only from 5 on)
    (the record of a refused nonce is fixed-size: no request data, only the nonce's hash)
 3. verify the evidence: genuine hardware, chain to a trusted root, TCB   NotGenuineError 403
    level; collateral the broker looks up itself only after the quote's
    PCK chain verified, and a failed lookup is remembered for a while;
    collateral the runner sent no older (tcbEvaluationDataNumber) than
    the broker's own for the same FMSPC (:class:`CollateralFloor`)
 4. REPORTDATA == binding(nonce, HPKE key, workload digest)             BindingError 403
    (secret provisioning: the RA-TLS certificate binds the TLS key instead)
 5. every requested key exists                                          UnknownKeyError 404
 6. every key's policy accepts the claims (``shieldml.policy.require``)  ReleaseDenied 403
 7. only then is any key unwrapped                                      -> :class:`Released`

:func:`decide` is synchronous (database, verification, a collateral source that may ask a PCCS):
callers on an event loop run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, NoReturn

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from shieldml.attest import (
    Claims,
    CrlSource,
    EnclaveIdentity,
    GpuClaims,
    IntelCollateral,
    TcbInfo,
    TrustAnchors,
    VerificationCache,
    detect_tee,
    extract,
    load_gpu_chain,
    load_pem_chain,
    not_in_cc_mode,
    verify_evidence,
    verify_gpu_evidence,
    verify_pck_chain,
)
from shieldml.broker import protocol
from shieldml.broker.audit import AuditProof
from shieldml.broker.server.storage import NAME_MAX, KeyEntry, Store, valid_key_name
from shieldml.errors import (
    AttestationError,
    BindingError,
    BrokerError,
    CollateralError,
    FormatError,
    IntegrityError,
    NonceError,
    NotGenuineError,
    PolicyDenied,
    PolicyError,
    ReleaseDenied,
    ShieldError,
    UnknownKeyError,
)
from shieldml.policy import Policy, Verdict, require

MAX_BODY = 1 << 20
BODY_TIMEOUT = 10.0
MAX_KEYS_PER_RELEASE = 32
CHALLENGE_RATE = protocol.CHALLENGE_RATE
CHALLENGE_BURST = protocol.CHALLENGE_BURST
#: how long a failed collateral lookup for the exact same quote is remembered (seconds)
COLLATERAL_MISS_TTL = 30.0
MAX_AUDIT_REASON = 4096  # characters of a verification failure kept in the audit record
NONCE_REFUSED = "nonce unknown, expired or already used"


class CollateralMisses:
    """Failed collateral lookups (a PCK chain that did not verify, a PCCS that failed), keyed by
    the SHA-256 of the exact quote bytes and kept ``ttl`` seconds: the same bad quote sent again
    is refused from here, without verifying its chain again or asking the PCCS again. Keyed by the
    exact bytes, an entry can refuse only that quote (another platform's quotes are unaffected).
    Bounded (LRU), thread-safe."""

    def __init__(
        self,
        ttl: float = COLLATERAL_MISS_TTL,
        max_entries: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[bytes, tuple[float, ShieldError]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, quote: bytes) -> ShieldError | None:
        key = hashlib.sha256(quote).digest()
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            if self.clock() >= hit[0]:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return hit[1]

    def put(self, quote: bytes, error: ShieldError) -> None:
        key = hashlib.sha256(quote).digest()
        error.__traceback__ = None  # keep no frames of the request alive in the cache
        with self._lock:
            self._entries[key] = (self.clock() + self.ttl, error)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


#: what collateral is compared by: (tee "SGX"/"TDX", FMSPC hex, root kind of the evidence)
FloorKey = tuple[str, str, str]


class CollateralFloor:
    """The newest Intel collateral (highest tcbEvaluationDataNumber) this broker has verified, per
    TEE, FMSPC and root kind: collateral a runner sends must not be older (the host keeps stale
    collateral that still calls its platform current after a TCB recovery). In memory, per worker
    process, bounded (LRU), thread-safe; it only ever rises."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[FloorKey, int] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(claims: Claims) -> FloorKey | None:
        fmspc = claims.platform.get("fmspc")
        if claims.tcb_evaluation_data_number is None or fmspc is None:
            return None
        return (claims.tee.value.upper(), fmspc.lower(), claims.root.value)

    def get(self, key: FloorKey) -> int | None:
        with self._lock:
            return self._entries.get(key)

    def raise_to(self, key: FloorKey, number: int) -> None:
        with self._lock:
            self._entries[key] = max(number, self._entries.get(key, number))
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


#: how long the broker's own collateral's tcbEvaluationDataNumber, once read, stands for its
#: TEE, FMSPC and root kind (seconds)
OWN_FLOOR_TTL = 10.0


class OwnFloor:
    """The tcbEvaluationDataNumber of the broker's own collateral per :data:`FloorKey`, read at
    most once per ``ttl`` seconds (a read that found none is not remembered) instead of on every
    release (reading it parses the quote, its chain and the collateral's JSON again, and for a
    simulated platform signs fresh CRLs). An entry is replaced once older than ``ttl``: collateral
    the broker refreshed is the floor at most ``ttl`` seconds later. Bounded (LRU), thread-safe."""

    def __init__(
        self,
        ttl: float = OWN_FLOOR_TTL,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[FloorKey, tuple[float, int | None]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: FloorKey, read: Callable[[], int | None]) -> int | None:
        """The number for ``key``: remembered, or ``read()`` now (outside the lock)."""
        started = self.clock()
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and started < hit[0]:
                self._entries.move_to_end(key)
                return hit[1]
        number = read()
        with self._lock:
            # stamped with when the read began; a slower read that began earlier never replaces
            # a newer one (it may have read collateral from before a refresh)
            hit = self._entries.get(key)
            if number is None:  # none at hand for this quote's lookup: another quote may have
                pass  # some for the same key (its PCK CA differs), so "none" is never remembered
            elif hit is None or hit[0] < started + self.ttl:
                self._entries[key] = (started + self.ttl, number)
            else:
                number = hit[1]
            if key in self._entries:
                self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return number


@dataclass
class Settings:
    nonce_ttl: timedelta = timedelta(seconds=60)
    trust: TrustAnchors = field(default_factory=TrustAnchors)
    max_body: int = MAX_BODY
    #: seconds a client has to send a whole request body (slow-body clients get 408)
    body_timeout: float = BODY_TIMEOUT
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    cache: VerificationCache = field(default_factory=VerificationCache)
    #: collateral for a DCAP quote the runner sent without it (e.g. from a PCCS cache); asked
    #: only for a quote whose PCK chain verified
    collateral_for: Callable[[bytes], IntelCollateral] | None = None
    #: failed lookups of ``collateral_for``, by exact quote bytes (see :class:`CollateralMisses`)
    collateral_misses: CollateralMisses = field(default_factory=CollateralMisses)
    #: the broker's own collateral for a quote's platform where it has some at hand (its cache, a
    #: trusted simulated platform), never asking anyone: collateral a runner sends is compared
    #: with it. Asked only for a quote that verified.
    own_collateral: Callable[[bytes], IntelCollateral | None] | None = None
    #: what ``own_collateral`` said, per TEE, FMSPC and root, for a few seconds (:class:`OwnFloor`)
    own_floor: OwnFloor | None = None
    #: AMD's CRL for SEV-SNP evidence that came without one (its cache, AMD's KDS, a trusted
    #: simulated platform's); asked only once the VCEK chain verified
    amd_crl_for: CrlSource | None = None
    #: the newest collateral verified so far, per FMSPC (see :class:`CollateralFloor`)
    collateral_floor: CollateralFloor = field(default_factory=CollateralFloor)
    #: ``/v1/challenge`` per client address, token bucket per worker: sustained rate (per
    #: second) and burst; beyond it, 429. ``challenge_rate = 0`` turns the limit off.
    challenge_rate: float = CHALLENGE_RATE
    challenge_burst: float = CHALLENGE_BURST
    #: the clock rate limits and cached misses are measured by (seconds, monotonic)
    monotonic: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if self.own_floor is None:
            self.own_floor = OwnFloor(clock=self.monotonic)


@dataclass(frozen=True)
class NonceBinding:
    """A nonce-bound release (``/v1/release``): the challenge nonce to consume, and the report
    data the evidence must carry (:func:`shieldml.broker.protocol.report_data` of the nonce, the
    runner's HPKE key and the workload digest)."""

    nonce: bytes
    report_data: bytes
    workload_digest: str


@dataclass(frozen=True)
class GpuBundle:
    """One GPU's evidence in a release request: the CC mode the runner read through NVML, the
    SPDM report (absent when the GPU gave none: not in CC mode), its chain (PEM) and the
    collateral the runner fetched (DER OCSP responses, driver/VBIOS RIMs)."""

    cc_mode: str
    report: bytes | None = None
    chain_pem: bytes | None = None
    ocsp: Sequence[bytes] = ()
    rims: Sequence[bytes] = ()


@dataclass(frozen=True)
class ReleaseRequest:
    """What one release decision is asked. ``binding`` None means the evidence is an RA-TLS
    certificate whose quote binds the key of the TLS connection it was presented on (Gramine
    secret provisioning), so ``tee`` must be ``"ratls"``."""

    evidence: bytes
    keys: Sequence[str]
    binding: NonceBinding | None
    channel: str = "http"
    event: str = "release"
    tee: str = "auto"
    collateral: Mapping[str, str] | None = None  # Intel collateral JSON members, as sent
    vcek: bytes | None = None
    cert_chain: str | None = None  # PEM ASK/ARK chain
    amd_crl: bytes | None = None  # AMD's CRL (DER or PEM), checked when sent
    #: the only key format this channel can deliver (secret provisioning: gramine-pf)
    key_format: str | None = None
    #: NVIDIA GPU evidence, one per GPU the runner saw, in its order (bound by gpu_nonce)
    gpus: Sequence[GpuBundle] = ()

    def __post_init__(self) -> None:
        if self.binding is None and self.tee != "ratls":
            raise ValueError("a release without a nonce binding needs RA-TLS evidence")


@dataclass(frozen=True)
class Released:
    """An allowed release: each key's ``(format, material)``, the claims and verdicts it was
    allowed on, and the audit record that says so (with its inclusion proof and the checkpoint
    signed for the tree it ends, in ``audit_proof``)."""

    keys: dict[str, tuple[str, bytes]] = field(repr=False)
    claims: Claims
    verdicts: dict[str, Verdict]
    audit_seq: int
    audit_proof: AuditProof | None = None
    #: the GPUs whose evidence was verified with the CPU's (in the request's order)
    gpus: tuple[GpuClaims, ...] = ()


class _Refused(Exception):  # noqa: N818 - internal control flow, never escapes decide()
    """A refusal on its way to the one audit write: the record's fields and the error to raise."""

    def __init__(
        self,
        record: dict[str, Any],
        make: Callable[[int], ShieldError],
        cause: BaseException | None,
    ) -> None:
        super().__init__()
        self.record = record
        self.make = make
        self.cause = cause


def decide(store: Store, settings: Settings, request: ReleaseRequest) -> Released:
    """Decide one release; raise the refusal (with its audit sequence number in ``detail``)."""
    names = list(dict.fromkeys(request.keys))
    _check_names(names)
    record: dict[str, Any] = {"channel": request.channel}
    if request.binding is not None:
        record["nonce_sha256"] = hashlib.sha256(request.binding.nonce).hexdigest()
    try:
        released = _decide(store, settings, request, names, record)
    except _Refused as r:
        seq = store.audit(request.event, {**record, "allowed": False, **r.record})
        raise r.make(seq) from r.cause
    entry = store.audit_entry(
        request.event,
        {
            **record,
            "allowed": True,
            **_claims_summary(released.claims),
            "matched_profiles": {n: v.matched for n, v in released.verdicts.items()},
        },
    )
    return Released(
        released.keys, released.claims, released.verdicts, entry.seq, entry, released.gpus
    )


def _check_names(names: list[str]) -> None:
    if not 1 <= len(names) <= MAX_KEYS_PER_RELEASE:
        raise BrokerError(400, f"a release names 1 to {MAX_KEYS_PER_RELEASE} keys")
    bad = next((n for n in names if not valid_key_name(n)), None)
    if bad is not None:
        raise BrokerError(
            400,
            f"invalid key name {bad[:NAME_MAX]!r}: ASCII letters, digits, '-', '_', '.', "
            f"1 to {NAME_MAX} characters",
        )


def _decide(
    store: Store,
    settings: Settings,
    request: ReleaseRequest,
    names: list[str],
    record: dict[str, Any],
) -> Released:
    binding = request.binding
    # 2, and the keys read in the same transaction (used only from step 5 on, after the evidence)
    consumed, stored = store.key_entries(
        names, consume=binding.nonce if binding is not None else None
    )
    if not consumed:
        # fixed size: the nonce's hash (already in the record) and the reason, nothing sent
        _refuse(
            {"reason": NONCE_REFUSED},
            lambda _seq: NonceError(409, f"{NONCE_REFUSED}: ask /v1/challenge for a new one"),
        )
    record["keys"] = names
    if binding is not None:
        record["workload_digest"] = binding.workload_digest
    try:  # 3
        claims = _verify(settings, request)
    except (AttestationError, FormatError) as e:
        reason = e.diagnostics()
        cause = e if isinstance(e, AttestationError) else None
        # the failed check by its parts (what the CLI lays out like `attest explain`), and every
        # check run up to it: all of it about the evidence the caller sent
        named: dict[str, Any] = {
            "check": cause.check if cause is not None else "format",
            "message": e.message,
            "expected": cause.expected if cause is not None else None,
            "found": cause.found if cause is not None else None,
            "hint": e.hint,
            "checks": [c.to_dict() for c in cause.checks] if cause is not None else [],
        }
        _refuse(
            {"reason": reason[:MAX_AUDIT_REASON]},
            lambda seq: NotGenuineError(
                403,
                {
                    "reason": protocol.NOT_GENUINE,
                    "reasons": [reason],
                    **named,
                    "audit_seq": seq,
                },
                cause=cause,
            ),
            e,
        )
    record["tee"] = claims.tee.value
    if binding is not None and not protocol.binding_matches(  # 4
        binding.report_data, claims.report_data
    ):
        _refuse(
            {"reason": "report data does not bind nonce, HPKE key and workload digest"},
            lambda seq: BindingError(
                403,
                {
                    "reason": "report data does not bind the nonce, HPKE key and workload digest",
                    "expected": binding.report_data.hex(),
                    "found": claims.report_data.hex(),
                    "audit_seq": seq,
                },
            ),
        )
    gpus: tuple[GpuClaims, ...] = ()
    if request.gpus:  # 4b: every GPU's evidence, bound to this session through gpu_nonce
        try:
            gpus = verify_session_gpus(settings, claims.report_data, request.gpus)
        except (AttestationError, FormatError) as e:
            gcause = e if isinstance(e, AttestationError) else None
            greason = "GPU evidence: " + e.diagnostics()
            gnamed: dict[str, Any] = {
                "reason": protocol.GPU_NOT_GENUINE,
                "reasons": [greason],
                "check": gcause.check if gcause is not None else "format",
                "message": e.message,
                "expected": gcause.expected if gcause is not None else None,
                "found": gcause.found if gcause is not None else None,
                "hint": e.hint,
                "checks": [c.to_dict() for c in gcause.checks] if gcause is not None else [],
            }
            _refuse(
                {"reason": greason[:MAX_AUDIT_REASON]},
                lambda seq: NotGenuineError(403, {**gnamed, "audit_seq": seq}, cause=gcause),
                e,
            )
        record["gpus"] = [g.summary() for g in gpus]
    entries: dict[str, KeyEntry] = {}
    for name in names:  # 5
        entry = stored[name]
        if isinstance(entry, IntegrityError):  # a row edited outside the broker: nothing released
            _refuse({"reason": entry.message[:MAX_AUDIT_REASON]}, _raise_as_is(entry))
        if isinstance(entry, ShieldError):  # e.g. its KEK file is gone: raised as before
            raise entry
        if entry is None:
            _refuse({"reason": f"unknown key {name}"}, _unknown_key(name))
        entries[name] = entry
    # the policies decided on, by hash: `audit verify` checks each against the last policy_set
    record["policy_sha256"] = {
        n: e.policy_sha256 for n, e in entries.items() if e.policy_sha256 is not None
    }
    workload = binding.workload_digest if binding is not None else None
    verdicts: dict[str, Verdict] = {}
    denied: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for name, entry in entries.items():  # 6
        if request.key_format is not None and entry.format != request.key_format:
            denied[name] = {
                "reason": f"a {entry.format} key; this channel delivers only "
                f"{request.key_format} keys"
            }
            failures.append(f"key {name}: format {entry.format}, not {request.key_format}")
            continue
        if entry.policy is None:
            denied[name] = {"reason": "no policy set for this key: denied by default"}
            failures.append(f"key {name}: no policy set")
            continue
        try:
            verdicts[name] = require(_parse_policy(entry.policy, name), claims, workload, gpus)
        except PolicyDenied as e:
            assert e.verdict is not None  # require() always carries its verdict
            denied[name] = e.verdict.to_dict()
            failures += e.verdict.failures()
        except PolicyError as e:  # a stored policy this build cannot read: denied, said why
            denied[name] = {"reason": f"the stored policy does not parse: {e.message}"}
            failures.append(f"key {name}: stored policy does not parse")
    if denied:
        _refuse(
            {**_claims_summary(claims), "denied": sorted(denied), "reasons": failures},
            lambda seq: ReleaseDenied(
                403,
                {"reason": "policy denied", "verdicts": denied, "audit_seq": seq},
                verdicts=[{"key": k, **v} for k, v in denied.items()],
            ),
        )
    try:  # 7: every policy accepted
        keys = {name: (entry.format, entry.unwrap()) for name, entry in entries.items()}
    except ShieldError as e:  # a wrapped key that fails authentication: nothing released
        failed = e
        _refuse({"reason": f"key material did not unwrap: {e.message}"}, lambda _seq: failed)
    return Released(keys, claims, verdicts, 0, gpus=gpus)


def verify_session_gpus(
    settings: Settings, report_data: bytes, bundles: Sequence[GpuBundle]
) -> tuple[GpuClaims, ...]:
    """Verify each GPU's evidence with the nonce of its place in this session."""
    if len(bundles) > protocol.MAX_GPUS:
        raise FormatError(f"at most {protocol.MAX_GPUS} GPUs per release")
    out = []
    seen: dict[bytes | str, int] = {}  # each GPU's serial and device keys -> its place
    for i, b in enumerate(bundles):
        nonce = protocol.gpu_nonce(report_data, i, len(bundles), b.cc_mode)
        if b.cc_mode != "on" or b.report is None or b.chain_pem is None:
            raise not_in_cc_mode(i, b.cc_mode, b.report is not None)
        chain = load_gpu_chain(b.chain_pem)
        c = verify_gpu_evidence(
            b.report,
            chain,
            now=settings.now(),
            trust=settings.trust,
            nonce=nonce,
            ocsp_responses=list(b.ocsp),
            rims=list(b.rims),
            cache=settings.cache,
        )
        # one GPU answering at two places of the session (it can sign any nonce) is one GPU:
        # by its serial, its attestation key or its device (BROM) key, never counted twice
        marks: list[bytes | str] = [f"ueid {c.ueid}"]
        marks += [
            cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            for cert in chain[:2]
        ]
        for mark in marks:
            if mark in seen:
                raise AttestationError(
                    "gpu distinct",
                    f"GPU {i} is GPU {seen[mark]} again (the same device's evidence at two places)",
                    expected="a different GPU at every place",
                    found=f"GPU {i}: ueid {c.ueid}",
                    hint="each GPU the VM owns gives its own evidence; a host that repeats one "
                    "GPU's evidence is hiding the others",
                )
            seen[mark] = i
        out.append(replace(c, cc_mode=b.cc_mode))
    return tuple(out)


def _raise_as_is(e: ShieldError) -> Callable[[int], ShieldError]:
    return lambda _seq: e


def _unknown_key(name: str) -> Callable[[int], ShieldError]:
    return lambda seq: UnknownKeyError(404, {"reason": f"unknown key {name!r}", "audit_seq": seq})


def _refuse(
    record: dict[str, Any], make: Callable[[int], ShieldError], cause: BaseException | None = None
) -> NoReturn:
    raise _Refused(record, make, cause)


def _verify(settings: Settings, request: ReleaseRequest) -> Claims:
    sent = request.collateral is not None
    collateral = (
        IntelCollateral.from_json(json.dumps(dict(request.collateral)))
        if request.collateral is not None
        else broker_collateral(settings, request.evidence, request.tee)
    )
    chain: list[x509.Certificate] | None = (
        load_pem_chain(request.cert_chain, "cert_chain") if request.cert_chain else None
    )
    claims = verify_evidence(
        request.evidence, tee=request.tee, collateral=collateral, vcek=request.vcek,
        cert_chain=chain, now=settings.now(), trust=settings.trust, cache=settings.cache,
        amd_crl=request.amd_crl, amd_crl_for=settings.amd_crl_for,
    )  # fmt: skip
    key = CollateralFloor.key(claims)
    if key is None or claims.tcb_evaluation_data_number is None:
        return claims
    number = claims.tcb_evaluation_data_number
    if sent:
        _not_older_than_the_brokers(settings, request, key, number)
    settings.collateral_floor.raise_to(key, number)
    return claims


def _not_older_than_the_brokers(
    settings: Settings, request: ReleaseRequest, key: FloorKey, number: int
) -> None:
    """Refuse collateral the runner sent that is older than what the broker has for the same
    TEE and FMSPC: its own (cached) collateral, or the newest it verified before."""
    floor = settings.collateral_floor.get(key)
    if settings.own_collateral is not None:
        own_collateral = settings.own_collateral

        def read() -> int | None:
            kind = detect_tee(request.evidence) if request.tee == "auto" else request.tee
            quote = extract(request.evidence).quote if kind == "ratls" else request.evidence
            return _evaluation_number(own_collateral(quote), key)

        assert settings.own_floor is not None  # made with the Settings
        own = settings.own_floor.get(key, read)
        if own is not None:
            floor = own if floor is None else max(floor, own)
    if floor is None or number >= floor:
        return
    raise CollateralError(
        "collateral",
        f"the collateral sent is older than the broker's for FMSPC {key[1]}",
        expected=f"tcbEvaluationDataNumber >= {floor}",
        found=f"tcbEvaluationDataNumber {number}",
        hint="send fresh collateral (Intel PCS or an up-to-date PCCS), or none: the broker then "
        "uses its own",
    )


def _evaluation_number(col: IntelCollateral | None, key: FloorKey) -> int | None:
    """The tcbEvaluationDataNumber of the broker's own collateral if it is for ``key``'s TEE and
    FMSPC. It is the broker's own (fetched by it, or its simulated platform's), so it is read, not
    verified again: damaged, it can only make the broker refuse, never accept older collateral."""
    if col is None:
        return None
    try:
        info = TcbInfo.from_json(col.tcb_info)
        ident = EnclaveIdentity.from_json(col.qe_identity)
    except CollateralError:
        return None
    if info.id != key[0] or info.fmspc.hex() != key[1]:
        return None
    return min(info.evaluation_data_number, ident.evaluation_data_number)


def broker_collateral(settings: Settings, evidence: bytes, tee: str) -> IntelCollateral | None:
    """The broker's own collateral for Intel evidence that came without it, or None.

    The quote's PCK chain is verified first (against the broker's trust anchors, at the
    verification time): a quote whose chain does not verify never reaches ``collateral_for``, so
    no PCCS is asked about a platform nobody vouched for. Failures are remembered briefly by the
    exact quote bytes (:class:`CollateralMisses`).
    """
    if settings.collateral_for is None:
        return None
    kind = detect_tee(evidence) if tee == "auto" else tee
    if kind == "snp":
        return None
    quote = extract(evidence).quote if kind == "ratls" else evidence
    missed = settings.collateral_misses.get(quote)
    if missed is not None:
        raise missed
    try:
        verify_pck_chain(quote, now=settings.now(), trust=settings.trust, cache=settings.cache)
        return settings.collateral_for(quote)
    except (AttestationError, FormatError) as e:
        settings.collateral_misses.put(quote, e)
        raise


@lru_cache(maxsize=256)
def _parse_policy(text: str, name: str) -> Policy:
    """Policies are re-read from the store on every release, so replicas see changes at once;
    parsing the same text again is what this cache saves."""
    return Policy.from_toml(text, f"policy of {name}")


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
