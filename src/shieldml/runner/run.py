"""``shieldml run``: measure, attest, get the keys, run the program in the decrypted view, seal.

Steps (each refusal stops the run before the program starts):
 1. check every trusted file against the manifest; compute the workload digest  TrustedFileError
 2. TDX: the digest extended into an RTMR ([tdx] in the manifest)          EvidenceError
    for each broker: challenge -> evidence binding nonce, HPKE key and digest -> release
                                                                  PolicyDenied / BrokerError
 3-5. the decrypted view (``shieldml.runner.view``): tmpfs mounts, inputs decrypted, program run
      with signals forwarded, outputs sealed atomically                        ViewError / IntegrityError
 6. a run receipt bound into a second piece of evidence
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from shieldml.broker import protocol
from shieldml.broker.client import BrokerClient
from shieldml.errors import BrokerError, ManifestError, MountChangedError, ViewError
from shieldml.runner.evidence import Provider, provider_for
from shieldml.runner.gpu import NvmlGpuProvider, gpu_provider_for
from shieldml.runner.manifest import JobManifest
from shieldml.runner.receipt import write_receipt


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
    m: JobManifest,
    provider: Provider,
    digest: str,
    log: Callable[[str], None],
    gpu_provider: NvmlGpuProvider | None = None,
) -> tuple[dict[KeyRef, tuple[str, bytes]], dict[str, int], dict[str, dict[str, Any]]]:
    """Every key the job needs, each from its own broker: ``(keys by (broker, name), audit
    sequence per broker, audit proof per broker)`` (a proof: the release's record, its inclusion
    proof and the broker's signed checkpoint, from brokers that send one). A broker's answer can
    only fill that broker's own names; one that adds, omits or re-formats a key is refused before
    anything is decrypted. With ``gpu_provider`` every GPU's evidence, bound to the same session,
    goes with each release."""
    need = needed_keys(m)
    keys: dict[KeyRef, tuple[str, bytes]] = {}
    audit: dict[str, int] = {}
    proofs: dict[str, dict[str, Any]] = {}
    for b in m.brokers:
        if b.name not in need:
            continue
        with BrokerClient(b.url, fingerprint=b.fingerprint) as c:
            nonce = c.challenge()
            rk = protocol.RunnerKey.generate()
            rd = protocol.report_data(nonce, rk.kem_id, rk.public_bytes, digest)
            ev = provider.evidence(rd)
            gpus = [g.to_dict() for g in gpu_provider.collect(rd)] if gpu_provider else None
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
                gpus=gpus,
            )
        for name, (fmt, _key) in got.keys.items():
            if fmt != need[b.name][name]:
                raise BrokerError(
                    None,
                    f"{b.name}: key {name!r} is a {fmt} key, the job uses it as {need[b.name][name]}",
                    hint="the broker holds a key of another format under this name; nothing was used",
                )
        log(
            f"{b.name}: released {', '.join(sorted(got.keys))} (audit record {got.audit_seq}, {got.tee})"
        )
        keys.update({(b.name, n): k for n, k in got.keys.items()})
        audit[b.name] = got.audit_seq
        if got.audit_proof is not None:
            proofs[b.name] = got.audit_proof.to_dict()
    return keys, audit, proofs


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


class ViewHook(Protocol):
    """What ``shieldml serve`` adds to a run (``shieldml.serve``): ``prepare`` once the keys are
    released, before the view starts; ``running`` is entered once the view process was started
    and left when it has exited (the program's outputs are sealed as in any run)."""

    def prepare(self, m: JobManifest, provider: Provider, digest: str) -> None: ...

    def running(
        self, proc: subprocess.Popen[bytes], channel: socket.socket | None
    ) -> contextlib.AbstractContextManager[object]:
        """``channel``: with a ``[serve]`` table, the runner's end of the view's connector (the
        program runs in a network namespace of its own: each byte sent asks for a new connection
        to its loopback port, answered with the descriptor, SCM_RIGHTS, or ``E`` and a reason)."""
        ...


def _quiet(_msg: str) -> None:
    pass


def run_job(
    manifest_path: str | os.PathLike[str],
    *,
    extra_args: tuple[str, ...] = (),
    receipt: str | None = None,
    log: Callable[[str], None] | None = None,
    stats: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    hook: ViewHook | None = None,
) -> int:
    """Run the job of ``manifest_path``; return the program's exit status.

    ``hook``: see :class:`ViewHook` (``shieldml serve``).

    ``report``, if given, is filled as the run goes: ``workload_digest``, ``brokers`` (per
    broker the keys it released and its audit record), ``receipt``, ``exit_code``; what is
    there when an error is raised says how far the run got.
    """
    say: Callable[[str], None] = log or _quiet
    rep: dict[str, Any] = report if report is not None else {}
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
    rep["workload_digest"] = digest
    times.measure_s = time.perf_counter() - t0
    say(f"workload digest {digest}")
    tdx = m.tdx_settings
    provider = provider_for(m.tee, m.simulated, base=m.base, rtmr=tdx.rtmr, extend=tdx.extend)
    t1 = time.perf_counter()
    # TDX: the digest measured into an RTMR before any evidence ([tdx]; fails closed if required)
    binding = provider.bind_workload(digest)
    if binding is not None:
        say(binding.describe())
    gpu = gpu_provider_for(m, say) if m.gpu is not None else None
    keys, audit, audit_proofs = release_keys(m, provider, digest, say, gpu)  # 2
    rep["brokers"] = {
        b: {"keys": sorted(n for (kb, n) in keys if kb == b), "audit_seq": seq}
        for b, seq in audit.items()
    }
    times.attest_s = time.perf_counter() - t1
    if hook is not None:
        hook.prepare(m, provider, digest)
    t2 = time.perf_counter()
    result = _view(m, keys, extra_args, trusted, hook)  # 3-5
    times.view_s = time.perf_counter() - t2
    status = int(result["status"])
    rep["exit_code"] = status
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
        write_receipt(  # 6
            receipt,
            digest=digest,
            audit=audit,
            audit_log=audit_proofs,
            result=result,
            status=status,
            started=started,
            provider=provider,
            binding=binding,
        )
        rep["receipt"] = receipt
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
    hook: ViewHook | None = None,
) -> dict[str, Any]:
    r, w = os.pipe()
    channel = theirs = None
    if hook is not None and m.serve is not None:
        channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    plan: dict[str, Any] = {
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
    if theirs is not None and m.serve is not None:
        plan["serve"] = {"port": m.serve.port, "channel_fd": theirs.fileno()}
    proc = subprocess.Popen(
        [sys.executable, "-I", "-m", "shieldml.runner.view"],
        stdin=subprocess.PIPE,
        pass_fds=(w,) if theirs is None else (w, theirs.fileno()),
        cwd="/",
        env=_view_env(),
    )
    os.close(w)
    if theirs is not None:
        theirs.close()
    # Forward the operator's signals to the program (only the main thread may set handlers;
    # a library caller in another thread keeps its own handling).
    forwarding = threading.current_thread() is threading.main_thread()
    previous = {
        s: signal.signal(s, lambda signum, _f: proc.send_signal(signum))
        for s in ((signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if forwarding else ())
    }
    try:
        if proc.stdin is None:
            raise ViewError("could not start the decrypted view")
        proc.stdin.write(json.dumps(plan).encode())
        proc.stdin.close()
        with (
            hook.running(proc, channel) if hook is not None else contextlib.nullcontext(),
            os.fdopen(r, "rb") as f,
        ):
            raw = f.read()
            proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if channel is not None:
            channel.close()
    try:
        result: dict[str, Any] = json.loads(raw) if raw else {}
    except ValueError:
        result = {}
    if "error" in result and result.get("started"):  # only a mount changed under the program
        raise MountChangedError(
            f"the program ran, but its outputs were not sealed: {result['error']}"
        )
    if "error" in result:
        raise ViewError(f"the program was not started: {result['error']}")
    if "status" not in result:
        raise ViewError(f"the decrypted view failed (exit {proc.returncode}); no output was sealed")
    return result
