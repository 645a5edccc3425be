"""Broker processes on loopback for the demo, the examples and the tests (not for production).

:func:`start_broker` runs ``shieldml broker serve`` in a child process with a fresh state
directory, waits until it accepts connections, and returns its URL, the fingerprint of the
certificate it serves (read from the certificate file, the same one ``serve`` prints) and the
file holding its admin token.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shieldml.broker.tls import cert_fingerprint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class BrokerProcess:
    proc: subprocess.Popen[str]
    url: str
    fingerprint: str
    token_file: Path
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_broker(
    state: Path,
    *args: str,
    database: str | None = None,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> BrokerProcess:
    port = port or free_port()
    state.mkdir(parents=True, exist_ok=True)
    log = state / f"serve-{port}.log"
    token_file = state / "admin-token"
    cmd = [sys.executable, "-m", "shieldml.cli", "broker", "serve", "--state", str(state), "--port", str(port),
           "--admin-token-file", str(token_file), *args]  # fmt: skip
    if database:
        cmd += ["--database", database]
    with log.open("w") as f:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "COLUMNS": "500", **(env or {})},
        )
    # serve binds its port before it creates any state, so an accepted connection alone does not
    # mean the certificate exists yet: wait for the line it prints once everything is in place
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited: {log.read_text()}")
        if "broker listening on" in log.read_text():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                pass
        time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError(f"broker did not start: {log.read_text()}")
    if "--insecure-no-tls" in args:
        return BrokerProcess(proc, f"http://127.0.0.1:{port}", "", token_file, log)
    cert = (
        Path(args[args.index("--tls-cert") + 1]) if "--tls-cert" in args else state / "tls-cert.pem"
    )
    return BrokerProcess(
        proc, f"https://127.0.0.1:{port}", cert_fingerprint(cert.read_bytes()), token_file, log
    )
