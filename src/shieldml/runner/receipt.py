"""Run receipts: what ``shieldml run --receipt`` writes, and how anyone checks one later.

A receipt's body names the workload digest, the ciphertexts read and written (with SHA-256 of
each file), which broker's key sealed each output, the brokers' audit positions (and, from
brokers that send them, each release's audit record with its inclusion proof and the broker's
signed checkpoint) and the exit code. Its hash goes into the report data of a second piece of evidence (domain
``shieldml/v1 receipt``), so the body cannot change without the evidence no longer binding it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shieldml.broker import protocol
from shieldml.errors import FormatError, ReceiptError
from shieldml.runner.evidence import Evidence, Provider, WorkloadExtension
from shieldml.runner.manifest import sha256_file

if TYPE_CHECKING:
    from collections.abc import Sequence

    from shieldml.attest import Claims, TrustAnchors
    from shieldml.broker.tlog import NoteVerifier
    from shieldml.policy import Policy, Verdict

__all__ = [
    "RECEIPT_DOMAIN",
    "VerifiedReceipt",
    "receipt_report_data",
    "verify_receipt",
    "write_receipt",
]

RECEIPT_DOMAIN = b"shieldml/v1 receipt\0"


def receipt_report_data(body: dict[str, Any]) -> bytes:
    text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha512(RECEIPT_DOMAIN + hashlib.sha256(text).digest()).digest()


def write_receipt(
    path: str,
    *,
    digest: str,
    audit: dict[str, int],
    result: dict[str, Any],
    audit_log: dict[str, dict[str, Any]] | None = None,
    gpus: dict[str, list[dict[str, Any]]] | None = None,
    status: int,
    started: datetime,
    provider: Provider,
    binding: WorkloadExtension | None = None,
) -> None:
    from shieldml.attest import iso_utc

    body = {
        "shieldml_receipt": 1,
        "workload_digest": digest,
        # the digests of the bytes the view decrypted (and below, sealed), never re-read from the
        # host's paths: the host can swap a file between the run and this receipt
        "inputs": result["inputs"],
        "outputs": result["outputs"],
        "broker_audit_seq": audit,
        # per broker: the release's audit record, its inclusion proof, the signed checkpoint
        **({"broker_audit_log": audit_log} if audit_log else {}),
        # per broker: each GPU it verified beside the CPU evidence (identity, versions, RIMs)
        **({"gpus": gpus} if gpus else {}),
        "exit_code": status,
        "started": iso_utc(started),
        "finished": iso_utc(datetime.now(UTC)),
    }
    if binding is not None:  # TDX: which RTMR the run extended with the digest, and to what
        body["rtmr_extension"] = binding.to_dict()
    ev: Evidence = provider.evidence(receipt_report_data(body))
    doc = {
        "receipt": body,
        "evidence": {
            "tee": ev.tee,
            "data": base64.b64encode(ev.data).decode(),
            "collateral": ev.collateral,
            "vcek": base64.b64encode(ev.vcek).decode() if ev.vcek else None,
        },
    }
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


@dataclass(frozen=True)
class VerifiedReceipt:
    """A receipt whose evidence is genuine, binds it, and satisfies the policy."""

    body: dict[str, Any]
    claims: Claims
    verdict: Verdict
    files_checked: bool = field(default=True)
    #: broker -> size of the signed checkpoint its release was shown to be in (``log_keys``)
    logged: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": True,
            "files_checked": self.files_checked,
            "logged": self.logged,
            "claims": self.claims.to_dict(),
            "verdict": self.verdict.to_dict(),
            "receipt": self.body,
        }


def verify_receipt(
    path: str,
    *,
    policy: Policy,
    now: datetime | None = None,
    trust: TrustAnchors | None = None,
    check_files: bool = True,
    log_keys: Sequence[NoteVerifier] = (),
    amd_crl: bytes | None = None,
) -> VerifiedReceipt:
    """Verify a receipt: genuine evidence that binds it, accepted by ``policy``; then the files.

    ``policy`` is a release policy (the TOML a broker uses) evaluated on the evidence's claims with
    the receipt's workload digest, by the broker's gate: :class:`~shieldml.errors.PolicyDenied`
    (with the verdict) when no profile accepts. Genuine evidence alone proves nothing about a
    receipt: any enclave on a genuine platform, a debug one included, can put any body into its
    report data, so only the measurements the policy pins say *which* code vouched for it. Debug,
    simulated and custom-root evidence pass only through the policy's ``insecure_allow_*`` switches.
    ``amd_crl`` is AMD's CRL for SEV-SNP evidence (policies deny evidence not checked against it).

    Raises :class:`~shieldml.errors.FormatError` for a file that is not a receipt,
    :class:`~shieldml.errors.AttestationError` for evidence that is not genuine, and
    :class:`~shieldml.errors.ReceiptError` when the evidence does not bind the body or (with
    ``check_files``) a file differs from the receipt; that error carries ``problems`` and the
    ``verified`` receipt.

    Each of ``log_keys`` (a broker's audit-log verifier key) must have signed the checkpoint of
    a release in the receipt (``broker_audit_log``): that release's record must be in the
    checkpoint's tree, at the receipt's audit position for that broker, an allowed release for
    the receipt's workload digest; else :class:`~shieldml.errors.ReceiptError`. The owner can
    then check with ``shieldml audit verify --checkpoint`` that the broker's log still extends
    that checkpoint.
    """
    from shieldml.attest import IntelCollateral, verify_evidence
    from shieldml.policy import Policy as PolicyType
    from shieldml.policy import listed_gpu_problems, require

    try:
        doc = json.loads(Path(path).read_text())
        body, ev = doc["receipt"], doc["evidence"]
        data = base64.b64decode(ev["data"])
        col = (
            IntelCollateral.from_json(json.dumps(ev["collateral"]))
            if ev.get("collateral")
            else None
        )
        vcek = base64.b64decode(ev["vcek"]) if ev.get("vcek") else None
        items = [*body["inputs"], *body["outputs"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{path}: not a shieldml run receipt: {e}") from e
    claims = verify_evidence(
        data, tee=ev.get("tee", "auto"), collateral=col, vcek=vcek, now=now, trust=trust,
        amd_crl=amd_crl,
    )  # fmt: skip
    if not protocol.binding_matches(receipt_report_data(body), claims.report_data):
        raise ReceiptError(
            f"{path}: the evidence does not bind this receipt (edited after the run?)"
        )
    digest = body.get("workload_digest")
    # the GPUs are not in the receipt's evidence: each broker verified theirs at the release, and
    # the receipt lists what it verified (bound by the evidence); checked against the GPU
    # requirement below, the CPU's evidence against the rest of the policy here
    cpu_policy = PolicyType(tuple(replace(p, gpu=None) for p in policy.profiles), policy.source)
    verdict = require(cpu_policy, claims, digest if isinstance(digest, str) else None)
    logged = _check_logged(path, body, log_keys)
    # every profile the CPU evidence meets, in order: the first whose GPU requirement the
    # listed GPUs meet too is the one that accepts (the broker released under any of them)
    listed, seqs = body.get("gpus"), body.get("broker_audit_seq")
    first: list[str] | None = None
    for result, profile in zip(verdict.profiles, policy.profiles, strict=True):
        if not result.passed:
            continue
        problems = listed_gpu_problems(profile, listed, seqs)
        if not problems:
            verdict = replace(verdict, matched=result.index)
            break
        first = first if first is not None else problems
    else:
        verified = VerifiedReceipt(body, claims, verdict, files_checked=False, logged=logged)
        raise ReceiptError(
            f"{path}: the GPUs it lists do not meet the policy's [profile.gpu]",
            problems=first or [],
            verified=verified,
            gpus=True,
        )
    verified = VerifiedReceipt(body, claims, verdict, files_checked=check_files, logged=logged)
    if check_files:
        for item in items:
            p = Path(item["ciphertext"])
            for rel, h in item["sha256"].items():
                f = p / rel if rel else p
                if not f.exists() or sha256_file(str(f)) != h:
                    problems.append(f"{f}: differs from the receipt")
        if problems:
            raise ReceiptError(
                f"{path}: {len(problems)} file(s) no longer match the receipt",
                problems=problems,
                verified=verified,
            )
    return verified


def _check_logged(
    path: str, body: dict[str, Any], log_keys: Sequence[NoteVerifier]
) -> dict[str, int]:
    """Broker -> checkpoint size, for the releases whose checkpoint one of ``log_keys`` signed."""
    from shieldml.broker.audit import AuditProof
    from shieldml.broker.tlog import split_note
    from shieldml.errors import AuditChainError

    entries = body.get("broker_audit_log") or {}
    seqs = body.get("broker_audit_seq") or {}
    if not isinstance(entries, dict) or not isinstance(seqs, dict):
        raise FormatError(f"{path}: malformed broker_audit_log")
    logged: dict[str, int] = {}
    for key in log_keys:
        found = False
        for broker, doc in entries.items():
            proof = AuditProof.from_dict(doc)
            signers = {(n, blob[:4]) for n, blob in split_note(proof.checkpoint)[1]}
            if (key.name, key.key_hash) not in signers:
                continue
            found = True
            try:
                cp = proof.verify([key])
            except AuditChainError as e:
                raise ReceiptError(f"{path}: broker {broker!r}: {e.message}") from None
            d = proof.data
            if not (
                seqs.get(broker) == proof.seq
                and proof.event == "release"
                and d.get("allowed") is True
                and d.get("workload_digest") == body.get("workload_digest")
            ):
                raise ReceiptError(
                    f"{path}: broker {broker!r}: the logged record is not this run's release"
                )
            logged[broker] = cp.size
        if not found:
            raise ReceiptError(
                f"{path}: no release in the receipt is in a checkpoint signed by log key "
                f"{key.name!r}"
            )
    return logged
