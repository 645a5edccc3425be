"""``shieldml serve``: a job whose program is a model server, behind attested TLS.

The run is ``shieldml run``'s (:func:`shieldml.runner.run_job`: measure, attest, release the keys,
decrypt into the private root, seal the outputs, write the receipt), with a :class:`ServeHook`:

1. once the keys are released, a TLS key is generated in this process (never written anywhere)
   and an RA-TLS certificate made for it (:class:`TlsIdentity`);
2. once the program runs, the hook waits until it answers on ``127.0.0.1:[serve] port`` — and
   only through a listening socket that belongs to the program itself (a process of the host's
   that took the port first is refused, never proxied to);
3. then it listens on the public address with TLS (:class:`Front`) until the program exits.

Clients verify it with :mod:`shieldml.client`. ``docs/serving.md``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shieldml.errors import ManifestError, ShieldError, ViewError
from shieldml.runner.evidence import Provider
from shieldml.runner.manifest import JobManifest, ServeSettings
from shieldml.serve._front import Front
from shieldml.serve._identity import TlsIdentity, memory_file

__all__ = [
    "Front",
    "ServeHook",
    "TlsIdentity",
    "listener_owner",
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


def _tcp_listeners(port: int) -> set[int]:
    """Socket inodes listening on 127.0.0.1:port, ::1 or a wildcard address with that port."""
    inodes: set[int] = set()
    want = f"{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            _addr, _, p = f[1].partition(":")
            if p == want and f[3] == "0A":  # LISTEN
                inodes.add(int(f[9]))
    return inodes


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):  # noqa: PTH208 - names only
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += children.get(pid, [])
    return out


def _sockets_of(pids: set[int]) -> set[int]:
    inodes: set[int] = set()
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")  # noqa: PTH208
        except OSError:
            continue
        for n in names:
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{n}")  # noqa: PTH115
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
    return inodes


def listener_owner(port: int, root_pid: int) -> str:
    """Who listens on the program's port: ``"none"``, ``"program"`` (only sockets of
    ``root_pid`` and its descendants) or ``"other"`` (some socket of another process)."""
    listening = _tcp_listeners(port)
    if not listening:
        return "none"
    return "program" if listening <= _sockets_of(_descendants(root_pid)) else "other"


def _answers(port: int, path: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
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
        poll: float = 1.0,
    ) -> None:
        self.listen = listen
        self.log = log
        self.on_ready = on_ready
        self.poll = poll
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
    def running(self, proc: subprocess.Popen[bytes]) -> Iterator[object]:
        thread = threading.Thread(
            target=self._thread, args=(proc,), name="shieldml-serve", daemon=True
        )
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=10)
            if self.front is not None:
                self.front.close()

    def _thread(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            self._main(proc)
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

    def _own_listener(self, s: ServeSettings, proc: subprocess.Popen[bytes]) -> bool:
        owner = listener_owner(s.port, proc.pid)
        if owner == "other":
            raise ViewError(
                f"127.0.0.1:{s.port}: a process outside the job listens on the program's port",
                hint="another process took the port (the host?); requests are never sent to "
                "it: free the port and start again",
            )
        return owner == "program"

    def _main(self, proc: subprocess.Popen[bytes]) -> None:
        s, provider, identity = self._settings, self._provider, self.identity
        assert s is not None and provider is not None and identity is not None
        deadline = time.monotonic() + s.ready_timeout
        while not (self._own_listener(s, proc) and _answers(s.port, s.ready_path)):
            if proc.poll() is not None or self._stop.is_set():
                return  # the program ended before it answered: run_job reports its exit
            if time.monotonic() > deadline:
                raise ViewError(
                    f"the program did not answer on 127.0.0.1:{s.port}{s.ready_path} within "
                    f"{s.ready_timeout:g} s; not listening publicly"
                )
            self._stop.wait(0.05)
        self.front = Front(identity, provider, self._digest, s.port, log=self.log)
        host, port = parse_listen(self.listen or s.listen)
        self.address = self.front.start(host, port)
        self.log(f"serving on https://{self.address[0]}:{self.address[1]} (attested TLS)")
        if self.on_ready is not None:
            self.on_ready(self.address, identity)
        # the listener must stay the program's for as long as requests go to it
        while not self._stop.wait(self.poll):
            self._own_listener(s, proc)  # raises when another process listens there


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
