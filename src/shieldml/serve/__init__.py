"""``shieldml serve``: a job whose program is a model server, behind attested TLS.

The run is ``shieldml run``'s (:func:`shieldml.runner.run_job`: measure, attest, release the keys,
decrypt into the private root, seal the outputs, write the receipt), with a :class:`ServeHook`:

1. once the keys are released, a TLS key is generated in this process (never written anywhere)
   and an RA-TLS certificate made for it (:class:`TlsIdentity`);
2. the program runs in a network namespace of its own (only its loopback): no other process can
   take its port or connect to it. The hook waits until it answers on ``127.0.0.1:[serve] port``
   there, through connections the view's connector opens inside it (:class:`Connector`);
3. then it listens on the public address with TLS (:class:`Front`) until the program exits.

Clients verify it with :mod:`shieldml.client`. ``docs/serving.md``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from shieldml.errors import ManifestError, ShieldError, ViewError
from shieldml.runner.evidence import Provider
from shieldml.runner.manifest import JobManifest, ServeSettings
from shieldml.serve._front import Front
from shieldml.serve._identity import TlsIdentity, memory_file

__all__ = [
    "Connector",
    "Front",
    "ServeHook",
    "TlsIdentity",
    "memory_file",
    "parse_listen",
    "serve_job",
]


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ShieldError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class Connector:
    """New connections to the program's loopback port, which lies in a network namespace of the
    program's own: each is asked of the view's connector thread over ``channel`` and arrives
    as a descriptor (SCM_RIGHTS). Thread-safe (one request at a time on the channel)."""

    def __init__(self, channel: socket.socket, port: int) -> None:
        self.channel, self.port = channel, port
        channel.settimeout(15.0)  # the connector's own connect times out after 10 s
        self._lock = threading.Lock()

    def __call__(self) -> socket.socket:
        with self._lock:
            self.channel.send(b"c")
            msg, anc, _flags, _addr = self.channel.recvmsg(256, socket.CMSG_SPACE(4))
        fds = [
            int.from_bytes(data[:4], sys.byteorder)
            for level, kind, data in anc
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(data) >= 4
        ]
        if msg != b"C" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            reason = msg[2:].decode(errors="replace") if msg.startswith(b"E") else "no answer"
            raise ConnectionError(f"127.0.0.1:{self.port} in the program's namespace: {reason}")
        return socket.socket(fileno=fds[0])


def _answers(connect: Connector, path: str) -> bool:
    try:
        with connect() as s:
            s.settimeout(2)
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{connect.port}\r\nConnection: close\r\n\r\n".encode()
            )
            return s.recv(8).startswith(b"HTTP/1.")
    except OSError:
        return False


class ServeHook:
    """The :class:`shieldml.runner.run.ViewHook` of ``shieldml serve``."""

    def __init__(
        self,
        *,
        listen: str | None = None,
        log: Callable[[str], None] = lambda _s: None,
        on_ready: Callable[[tuple[str, int], TlsIdentity], None] | None = None,
    ) -> None:
        self.listen = listen
        self.log = log
        self.on_ready = on_ready
        self.identity: TlsIdentity | None = None
        self.front: Front | None = None
        self.address: tuple[str, int] | None = None
        self.failure: ShieldError | None = None
        self._settings: ServeSettings | None = None
        self._provider: Provider | None = None
        self._digest = ""
        self._stop = threading.Event()

    def prepare(self, m: JobManifest, provider: Provider, digest: str) -> None:
        if m.serve is None:
            raise ManifestError(
                f"{m.source}: `shieldml serve` needs a [serve] table (the program's port)",
                hint="add [serve] port = 8000 (where the program listens on 127.0.0.1)",
            )
        self._settings, self._provider, self._digest = m.serve, provider, digest
        self.identity = TlsIdentity.generate(provider, digest)
        self.log(f"TLS key made in the TEE: SPKI SHA-256 {self.identity.spki_sha256}")

    @contextlib.contextmanager
    def running(
        self, proc: subprocess.Popen[bytes], channel: socket.socket | None
    ) -> Iterator[object]:
        if channel is None:
            raise ShieldError("shieldml serve: the runner gave no connector channel")
        assert self._settings is not None
        connect = Connector(channel, self._settings.port)
        thread = threading.Thread(
            target=self._thread, args=(proc, connect), name="shieldml-serve", daemon=True
        )
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=10)
            if self.front is not None:
                self.front.close()

    def _thread(self, proc: subprocess.Popen[bytes], connect: Connector) -> None:
        try:
            self._main(proc, connect)
        except ShieldError as e:
            self.failure = e
        except Exception as e:
            self.failure = ShieldError(f"the serving front failed: {type(e).__name__}: {e}")
        if self.failure is not None:
            self.log(f"serving stopped: {self.failure.message}")
            if self.front is not None:
                self.front.close()
            with contextlib.suppress(OSError):
                proc.terminate()  # fail closed: a program nobody can reach safely is stopped

    def _main(self, proc: subprocess.Popen[bytes], connect: Connector) -> None:
        s, provider, identity = self._settings, self._provider, self.identity
        assert s is not None and provider is not None and identity is not None
        deadline = time.monotonic() + s.ready_timeout
        while not _answers(connect, s.ready_path):
            if proc.poll() is not None or self._stop.is_set():
                return  # the program ended before it answered: run_job reports its exit
            if time.monotonic() > deadline:
                raise ViewError(
                    f"the program did not answer on 127.0.0.1:{s.port}{s.ready_path} within "
                    f"{s.ready_timeout:g} s; not listening publicly"
                )
            self._stop.wait(0.05)
        self.front = Front(identity, provider, self._digest, connect, log=self.log)
        host, port = parse_listen(self.listen or s.listen)
        self.address = self.front.start(host, port)
        self.log(f"serving on https://{self.address[0]}:{self.address[1]} (attested TLS)")
        if self.on_ready is not None:
            self.on_ready(self.address, identity)
        self._stop.wait()


def serve_job(
    manifest_path: str | os.PathLike[str],
    *,
    listen: str | None = None,
    receipt: str | None = None,
    log: Callable[[str], None] | None = None,
    report: dict[str, Any] | None = None,
    on_ready: Callable[[tuple[str, int], TlsIdentity], None] | None = None,
) -> int:
    """Run the server job of ``manifest_path`` behind attested TLS; return its exit status
    (raise the front's failure, if it stopped the program)."""
    from shieldml.runner.run import run_job

    if JobManifest.load(manifest_path).serve is None:  # before anything is measured or released
        raise ManifestError(
            f"{manifest_path}: `shieldml serve` needs a [serve] table (the program's port)",
            hint="add [serve] port = 8000 (where the program listens on 127.0.0.1), or use "
            "`shieldml run` for a batch job",
        )
    hook = ServeHook(listen=listen, log=log or (lambda _s: None), on_ready=on_ready)
    try:
        status = run_job(manifest_path, receipt=receipt, log=log, report=report, hook=hook)
    except ShieldError as e:
        if hook.failure is not None:  # the front stopped the program: its reason comes first
            raise hook.failure from e
        raise
    if hook.failure is not None:
        raise hook.failure
    return status
