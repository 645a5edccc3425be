"""Broker processes on loopback: for the demo, the examples and the tests (not production)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


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
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError(f"broker did not start: {log.read_text()}")
    text = log.read_text()
    m = re.search(r"fingerprint \(clients pin it\): ([0-9a-f]{64})", text)
    scheme = "https" if m else "http"
    return BrokerProcess(
        proc, f"{scheme}://127.0.0.1:{port}", m.group(1) if m else "", token_file, log
    )
