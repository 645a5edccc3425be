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
from pathlib import Path
from typing import Any, Protocol

from shieldml.broker import protocol
from shieldml.errors import BrokerError, ManifestError, MountChangedError, ViewError
from shieldml.runner.evidence import Provider, provider_for
from shieldml.runner.gpu import NvmlGpuProvider, gpu_provider_for
from shieldml.runner.manifest import JobManifest


@dataclass
class RunTimes:
    measure_s: float = 0.0
    attest_s: float = 0.0
    view_s: float = 0.0
    receipt_s: float = 0.0


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
) -> tuple[
    dict[KeyRef, tuple[str, bytes]],
    dict[str, int],
    dict[str, dict[str, Any]],
    dict[str, list[dict[str, Any]]],
]:
    """Every key the job needs, each from its own broker: ``(keys by (broker, name), audit
    sequence per broker, audit proof per broker, GPUs per broker)`` (a proof: the release's
    record, its inclusion proof and the broker's signed checkpoint, from brokers that send one;
    the GPUs: each one's identity and versions as the broker verified them). A broker's answer can
    only fill that broker's own names; one that adds, omits or re-formats a key is refused before
    anything is decrypted. With ``gpu_provider`` every GPU's evidence, bound to the same session,
    goes with each release."""
    from shieldml.broker.client import BrokerClient  # the HTTP client: once the view is started

    need = needed_keys(m)
    keys: dict[KeyRef, tuple[str, bytes]] = {}
    audit: dict[str, int] = {}
    proofs: dict[str, dict[str, Any]] = {}
    verified_gpus: dict[str, list[dict[str, Any]]] = {}
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
        if got.gpus:
            verified_gpus[b.name] = list(got.gpus)
            for i, g in enumerate(got.gpus):
                log(
                    f"{b.name}: GPU {i} verified ({g.get('arch')}, driver "
                    f"{g.get('driver_version')}, VBIOS {g.get('vbios_version')}, {g.get('root')} root)"
                )
    return keys, audit, proofs, verified_gpus


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


# The view imports shieldml from where this runner's own code lies: under -I the interpreter
# would otherwise take whichever shieldml its site-packages names first (an editable install of
# another checkout, say), and the view holding the keys would run other code than the runner.
# The directory is added only where it is not on the path already, so an installed shieldml
# keeps the interpreter's own order (the standard library first).
VIEW_BOOT = (
    "import sys; r = sys.argv.pop(1); r in sys.path or sys.path.insert(0, r); "
    "import shieldml.runner.view as v; sys.exit(v.main())"
)


def view_command() -> list[str]:
    """The view's command line: this interpreter, isolated (``-I``: no ``PYTHON*`` variable, no
    user site, no script or working directory on ``sys.path``), running this shieldml's view."""
    return [sys.executable, "-I", "-c", VIEW_BOOT, str(Path(__file__).resolve().parents[2])]


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
    # the view's interpreter starts while the job is measured and the brokers are asked
    view = _View(serve=hook is not None)
    try:
        m = JobManifest.load(manifest_path)
        if extra_args and not m.insecure_allow_extra_args:
            raise ManifestError(
                "extra arguments change what runs; the manifest must allow them (insecure_allow_extra_args)"
            )
        # 1: every trusted file read once and hashed in full (no cache the host could hand us
        # stands in for that); those very bytes, not the host's files, are what the program runs
        trusted: dict[str, tuple[int, bytes]] = {}
        digest = m.workload_digest(keep=trusted)
        rep["workload_digest"] = digest
        times.measure_s = time.perf_counter() - t0
        say(f"workload digest {digest}")
        tdx = m.tdx_settings
        provider = provider_for(m.tee, m.simulated, base=m.base, rtmr=tdx.rtmr, extend=tdx.extend)
        # 3 (begun): the view lays out the private root and copies the ciphertexts meanwhile
        view.send_plan(m, extra_args, trusted)
        t1 = time.perf_counter()
        # TDX: the digest measured into an RTMR before any evidence ([tdx]; fails closed if
        # required)
        binding = provider.bind_workload(digest)
        if binding is not None:
            say(binding.describe())
        gpu = gpu_provider_for(m, say) if m.gpu is not None else None
        keys, audit, audit_proofs, gpus = release_keys(m, provider, digest, say, gpu)  # 2
        if gpu is not None and not audit:
            say(
                "warning: [gpu], but the job needs no broker's key: no broker verified the GPUs,"
                " and a receipt names none"
            )
        rep["brokers"] = {
            b: {
                "keys": sorted(n for (kb, n) in keys if kb == b),
                "audit_seq": seq,
                **({"gpus": gpus[b]} if b in gpus else {}),
            }
            for b, seq in audit.items()
        }
        times.attest_s = time.perf_counter() - t1
        if hook is not None:
            hook.prepare(m, provider, digest)
    except BaseException:
        view.abort()
        raise
    t2 = time.perf_counter()
    result = view.finish(keys, hook)  # 3-5
    times.view_s = time.perf_counter() - t2
    status = int(result["status"])
    rep["exit_code"] = status
    view_times = result.get("times", {})
    if receipt:
        from shieldml.runner.receipt import write_receipt

        t3 = time.perf_counter()
        write_receipt(  # 6
            receipt,
            digest=digest,
            audit=audit,
            audit_log=audit_proofs,
            gpus=gpus,
            result=result,
            status=status,
            started=started,
            provider=provider,
            binding=binding,
        )
        times.receipt_s = time.perf_counter() - t3
        rep["receipt"] = receipt
        say(f"receipt written to {receipt}")
    phases = {
        "measure_s": times.measure_s,
        "attest_release_s": times.attest_s,
        "view_s": times.view_s,
        **view_times,
        "receipt_s": times.receipt_s,
        "total_s": time.perf_counter() - t0,
    }
    rep["times"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in phases.items()}
    if stats is not None:
        stats.update(phases)
    say(f"program exited with {status}; " + describe_times(phases))
    return status


#: the phases ``shieldml run`` reports, in order: (key in the run's times, what it is called)
PHASES = (
    ("measure_s", "measure"),
    ("attest_release_s", "attest+release"),
    ("root_s", "private root"),
    ("decrypt_s", "decrypt"),
    ("program_s", "program"),
    ("seal_s", "seal"),
    ("receipt_s", "receipt"),
)


def describe_times(times: dict[str, Any]) -> str:
    """``measure 0.01 s, attest+release 0.04 s, …``: the phases that ran."""
    shown = [(name, times[k]) for k, name in PHASES if k in times]
    if "receipt_s" in times and not times["receipt_s"]:
        shown = [(n, v) for n, v in shown if n != "receipt"]
    return ", ".join(f"{name} {value:.2f} s" for name, value in shown)


class _View:
    """The decrypted view process. Started first thing (its interpreter and imports load while
    the runner measures the job), it gets the plan once the job is measured, lays out the
    private root and copies and hashes the ciphertexts while the brokers are asked, and decrypts
    nothing before :meth:`finish` sends it the keys. :meth:`abort` (a bad manifest, a refusal,
    an interruption) ends it."""

    def __init__(self, *, serve: bool = False) -> None:
        r, w = os.pipe()
        # serve: the runner's end of the view's connector (a [serve] job's program runs in a
        # network namespace of its own; see ViewHook.running)
        self.channel: socket.socket | None = None
        theirs: socket.socket | None = None
        theirs_fd: int | None = None
        if serve:
            self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            theirs_fd = theirs.fileno()
        try:
            self.proc = subprocess.Popen(
                view_command(),
                stdin=subprocess.PIPE,
                pass_fds=(w,) if theirs_fd is None else (w, theirs_fd),
                cwd="/",
                env=_view_env(),
            )
        except BaseException:
            os.close(r)
            if self.channel is not None:
                self.channel.close()
            raise
        finally:
            os.close(w)
            if theirs is not None:
                theirs.close()
        self._result, self._result_w = r, w  # w: its number in the view (pass_fds keeps it)
        self._channel_w = theirs_fd  # its number there (pass_fds keeps it)
        if self.proc.stdin is None:
            self.abort()
            raise ViewError("could not start the decrypted view")

    def send_plan(
        self,
        m: JobManifest,
        extra_args: tuple[str, ...],
        trusted: dict[str, tuple[int, bytes]],
    ) -> None:
        """The job, as measured: what the view lays out and runs (no key)."""
        plan: dict[str, Any] = {
            "result_fd": self._result_w,
            "argv": [*m.argv, *extra_args],
            "cwd": m.cwd,
            "base": str(m.base),
            "trusted": [
                {"path": p, "mode": mode, "data": base64.b64encode(data).decode()}
                for p, (mode, data) in sorted(trusted.items())
            ],
            "env": _env(m),
            "inputs": [
                {
                    "path": i.path,
                    "ciphertext": i.ciphertext,
                    "broker": i.broker,
                    "key": i.key,
                    "format": i.format,
                    "sha256": i.sha256,
                    "bind": i.bound,
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
                    "bind": o.bound,
                    "recipient": base64.b64encode(o.recipient_key).decode()
                    if o.recipient_key
                    else None,
                }
                for o in m.outputs
            ],
        }
        if self._channel_w is not None and m.serve is not None:
            plan["serve"] = {"port": m.serve.port, "channel_fd": self._channel_w}
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(plan).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it failed at once: finish() reads why

    def abort(self) -> None:
        """End the view without keys (it removes its staging directory on the way out)."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        with contextlib.suppress(OSError):
            self.proc.terminate()
        self.proc.wait()
        with contextlib.suppress(OSError):
            os.close(self._result)
        if self.channel is not None:
            self.channel.close()

    def finish(
        self, keys: dict[KeyRef, tuple[str, bytes]], hook: ViewHook | None = None
    ) -> dict[str, Any]:
        """Send the keys, let the view decrypt, run the program and seal; its result.
        ``hook.running`` is entered while the program runs (``shieldml serve``)."""
        proc = self.proc
        # Forward the operator's signals to the program (only the main thread may set
        # handlers; a library caller in another thread keeps its own handling).
        forwarding = threading.current_thread() is threading.main_thread()
        previous = {
            s: signal.signal(s, lambda signum, _f: proc.send_signal(signum))
            for s in ((signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if forwarding else ())
        }
        try:
            doc = [
                {"broker": b, "name": n, "key": base64.b64encode(k).decode()}
                for (b, n), (_f, k) in sorted(keys.items())
            ]
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):  # it failed before: its result says why
                proc.stdin.write(json.dumps(doc).encode() + b"\n")
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            with (
                hook.running(proc, self.channel) if hook is not None else contextlib.nullcontext(),
                os.fdopen(self._result, "rb") as f,
            ):
                raw = f.read()
                proc.wait()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if self.channel is not None:
                self.channel.close()
        try:
            result: dict[str, Any] = json.loads(raw) if raw else {}
        except ValueError:
            result = {}
        if "error" in result and result.get("started"):  # only a mount changed under it
            raise MountChangedError(
                f"the program ran, but its outputs were not sealed: {result['error']}"
            )
        if "error" in result:
            raise ViewError(f"the program was not started: {result['error']}")
        if "status" not in result:
            raise ViewError(
                f"the decrypted view failed (exit {proc.returncode}); no output was sealed"
            )
        return result
