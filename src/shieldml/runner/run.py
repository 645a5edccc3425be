"""``shieldml run``: measure, attest, get the keys, run the program in the decrypted view, seal.

Steps (each refusal stops the run before the program starts):
 1. check every trusted file against the manifest; compute the workload digest  TrustedFileError
 2. for each broker: challenge -> evidence binding nonce, HPKE key and digest -> release
                                                                  PolicyDenied / BrokerError
 3-5. the decrypted view (``shieldml.runner.view``): tmpfs mounts, inputs decrypted, program run
      with signals forwarded, outputs sealed atomically                        ViewError / IntegrityError
 6. a run receipt bound into a second piece of evidence
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shieldml.broker import protocol
from shieldml.broker.client import BrokerClient
from shieldml.errors import ShieldError
from shieldml.runner.evidence import Evidence, Provider, provider_for
from shieldml.runner.manifest import JobManifest, ManifestError, sha256_file, tree_sha256

if TYPE_CHECKING:
    from shieldml.policy import Policy

RECEIPT_DOMAIN = b"shieldml/v1 receipt\0"


@dataclass
class RunTimes:
    measure_s: float = 0.0
    attest_s: float = 0.0
    view_s: float = 0.0


KeyRef = tuple[str, str]  # (broker name, key name): a key is always its owner's


def needed_keys(m: JobManifest) -> dict[str, dict[str, str]]:
    """``broker -> key name -> format`` for every broker-held key the job uses."""
    need: dict[str, dict[str, str]] = {}
    for item in m.inputs + m.outputs:
        if item.recipient_key is not None:
            continue
        have = need.setdefault(item.broker, {}).setdefault(item.key, item.format)
        if have != item.format:
            raise ManifestError(
                f"key {item.key!r} of broker {item.broker!r} is used as {have} and as {item.format}"
            )
    return need


def release_keys(
    m: JobManifest, provider: Provider, digest: str, log: Callable[[str], None]
) -> tuple[dict[KeyRef, tuple[str, bytes]], dict[str, int]]:
    """Every key the job needs, each from its own broker: ``(keys by (broker, name), audit
    sequence per broker)``. A broker's answer can only fill that broker's own names; one that
    adds, omits or re-formats a key is refused before anything is decrypted."""
    need = needed_keys(m)
    keys: dict[KeyRef, tuple[str, bytes]] = {}
    audit: dict[str, int] = {}
    for b in m.brokers:
        if b.name not in need:
            continue
        with BrokerClient(b.url, fingerprint=b.fingerprint) as c:
            nonce = c.challenge()
            rk = protocol.RunnerKey.generate()
            ev = provider.evidence(protocol.report_data(nonce, rk.kem_id, rk.public_bytes, digest))
            got = c.release(
                nonce,
                rk,
                digest,
                sorted(need[b.name]),
                ev.data,
                tee=ev.tee,
                collateral=ev.collateral,
                vcek=ev.vcek,
                cert_chain=ev.cert_chain,
            )
        for name, (fmt, _key) in got.keys.items():
            if fmt != need[b.name][name]:
                raise ShieldError(
                    f"{b.name}: key {name!r} is a {fmt} key, the job uses it as {need[b.name][name]}",
                    hint="the broker holds a key of another format under this name; nothing was used",
                )
        log(
            f"{b.name}: released {', '.join(sorted(got.keys))} (audit record {got.audit_seq}, {got.tee})"
        )
        keys.update({(b.name, n): k for n, k in got.keys.items()})
        audit[b.name] = got.audit_seq
    return keys, audit


def _env(m: JobManifest) -> dict[str, str]:
    env = {k: os.environ[k] for k in m.env_allow if k in os.environ}
    env.update(m.env_set)
    return env


# What the view process may inherit: it holds every key, so nothing of the host's choosing may
# reach its imports (-I: no PYTHON* variables, no user site, no script or working directory on
# sys.path; cwd=/; no inherited environment but these names).
VIEW_ENV_ALLOW = ("SHIELDML_NO_NATIVE",)


def _view_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in VIEW_ENV_ALLOW if k in os.environ}
    env["LC_ALL"] = "C.UTF-8"
    return env


def _quiet(_msg: str) -> None:
    pass


def run_job(
    manifest_path: str | os.PathLike[str],
    *,
    extra_args: tuple[str, ...] = (),
    receipt: str | None = None,
    log: Callable[[str], None] | None = None,
    stats: dict[str, Any] | None = None,
) -> int:
    say: Callable[[str], None] = log or _quiet
    times = RunTimes()
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    m = JobManifest.load(manifest_path)
    if extra_args and not m.insecure_allow_extra_args:
        raise ManifestError(
            "extra arguments change what runs; the manifest must allow them (insecure_allow_extra_args)"
        )
    # 1: every trusted file read once and hashed in full (no cache the host could hand us stands
    # in for that); those very bytes, not the host's files, are what the program runs
    trusted: dict[str, tuple[int, bytes]] = {}
    digest = m.workload_digest(keep=trusted)
    times.measure_s = time.perf_counter() - t0
    say(f"workload digest {digest}")
    provider = provider_for(m.tee, m.simulated, base=m.base)
    t1 = time.perf_counter()
    keys, audit = release_keys(m, provider, digest, say)  # 2
    times.attest_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    result = _view(m, keys, extra_args, trusted)  # 3-5
    times.view_s = time.perf_counter() - t2
    status = int(result["status"])
    if stats is not None:
        stats.update(
            {
                "measure_s": times.measure_s,
                "attest_release_s": times.attest_s,
                "view_s": times.view_s,
                **result.get("times", {}),
            }
        )
    if receipt:
        write_receipt(receipt, m, digest, audit, result, status, started, provider)  # 6
        say(f"receipt written to {receipt}")
    say(
        f"program exited with {status}; measure {times.measure_s:.2f} s, attest+release {times.attest_s:.2f} s, view {times.view_s:.2f} s"
    )
    return status


def _view(
    m: JobManifest,
    keys: dict[KeyRef, tuple[str, bytes]],
    extra_args: tuple[str, ...],
    trusted: dict[str, tuple[int, bytes]],
) -> dict[str, Any]:
    r, w = os.pipe()
    plan = {
        "result_fd": w,
        "argv": [*m.argv, *extra_args],
        "cwd": m.cwd,
        "base": str(m.base),
        "trusted": [
            {"path": p, "mode": mode, "data": base64.b64encode(data).decode()}
            for p, (mode, data) in sorted(trusted.items())
        ],
        "env": _env(m),
        "keys": [
            {"broker": b, "name": n, "key": base64.b64encode(k).decode()}
            for (b, n), (_f, k) in sorted(keys.items())
        ],
        "inputs": [
            {
                "path": i.path,
                "ciphertext": i.ciphertext,
                "broker": i.broker,
                "key": i.key,
                "format": i.format,
                "sha256": i.sha256,
            }
            for i in m.inputs
        ],
        "outputs": [
            {
                "path": o.path,
                "ciphertext": o.ciphertext,
                "broker": o.broker,
                "key": o.key,
                "format": o.format,
                "recipient": base64.b64encode(o.recipient_key).decode()
                if o.recipient_key
                else None,
            }
            for o in m.outputs
        ],
    }
    proc = subprocess.Popen(
        [sys.executable, "-I", "-m", "shieldml.runner.view"],
        stdin=subprocess.PIPE,
        pass_fds=(w,),
        cwd="/",
        env=_view_env(),
    )
    os.close(w)
    # Forward the operator's signals to the program (only the main thread may set handlers;
    # a library caller in another thread keeps its own handling).
    forwarding = threading.current_thread() is threading.main_thread()
    previous = {
        s: signal.signal(s, lambda signum, _f: proc.send_signal(signum))
        for s in ((signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if forwarding else ())
    }
    try:
        if proc.stdin is None:
            raise ShieldError("could not start the decrypted view")
        proc.stdin.write(json.dumps(plan).encode())
        proc.stdin.close()
        with os.fdopen(r, "rb") as f:
            raw = f.read()
        proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    try:
        result: dict[str, Any] = json.loads(raw) if raw else {}
    except ValueError:
        result = {}
    if "error" in result and result.get("started"):
        raise ShieldError(f"the program ran, but its outputs were not sealed: {result['error']}")
    if "error" in result:
        raise ShieldError(f"the program was not started: {result['error']}")
    if "status" not in result:
        raise ShieldError(
            f"the decrypted view failed (exit {proc.returncode}); no output was sealed"
        )
    return result


def receipt_report_data(body: dict[str, Any]) -> bytes:
    text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha512(RECEIPT_DOMAIN + hashlib.sha256(text).digest()).digest()


def write_receipt(
    path: str,
    m: JobManifest,
    digest: str,
    audit: dict[str, int],
    result: dict[str, Any],
    status: int,
    started: datetime,
    provider: Provider,
) -> None:
    inputs = []
    for i in m.inputs:
        p = Path(i.ciphertext)
        files = tree_sha256(p)
        inputs.append({"path": i.path, "ciphertext": i.ciphertext, "sha256": files})
    body = {
        "shieldml_receipt": 1,
        "workload_digest": digest,
        "inputs": inputs,
        "outputs": result["outputs"],
        "broker_audit_seq": audit,
        "exit_code": status,
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "finished": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
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


def verify_receipt(
    path: str,
    *,
    policy: Policy,
    now: datetime | None = None,
    trust: Any = None,
    check_files: bool = True,
) -> dict[str, Any]:
    """Verify a receipt: genuine evidence that binds it, accepted by ``policy``; then the files.

    ``policy`` is a release policy (the TOML a broker uses) evaluated on the evidence's claims with
    the receipt's workload digest, by the broker's gate: :class:`~shieldml.errors.PolicyDenied`
    (with the verdict) when no profile accepts. Genuine evidence alone proves nothing about a
    receipt: any enclave on a genuine platform, a debug one included, can put any body into its
    report data, so only the measurements the policy pins say *which* code vouched for it. Debug,
    simulated and custom-root evidence pass only through the policy's ``insecure_allow_*`` switches.
    """
    from shieldml.attest import IntelCollateral, verify_evidence
    from shieldml.policy import require

    try:
        doc = json.loads(Path(path).read_text())
        body, ev = doc["receipt"], doc["evidence"]
        data = base64.b64decode(ev["data"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShieldError(f"{path}: not a shieldml run receipt: {e}") from e
    col = IntelCollateral.from_json(json.dumps(ev["collateral"])) if ev.get("collateral") else None
    vcek = base64.b64decode(ev["vcek"]) if ev.get("vcek") else None
    claims = verify_evidence(
        data, tee=ev.get("tee", "auto"), collateral=col, vcek=vcek, now=now, trust=trust
    )
    if not protocol.binding_matches(receipt_report_data(body), claims.report_data):
        raise ShieldError(
            f"{path}: the evidence does not bind this receipt (edited after the run?)"
        )
    digest = body.get("workload_digest")
    verdict = require(policy, claims, digest if isinstance(digest, str) else None)
    problems = []
    if check_files:
        for item in body["inputs"] + body["outputs"]:
            p = Path(item["ciphertext"])
            for rel, h in item["sha256"].items():
                f = p / rel if rel else p
                if not f.exists() or sha256_file(str(f)) != h:
                    problems.append(f"{f}: differs from the receipt")
    return {
        "ok": not problems,
        "problems": problems,
        "claims": claims.to_dict(),
        "verdict": verdict.to_dict(),
        "receipt": body,
    }
