"""A model server job under ``shieldml serve`` on loopback (simulated SGX), and helpers.

The program is a stdlib HTTP/1.1 server that knows nothing of shieldml: it reads its decrypted
model, answers ``/`` with the model's size, its request count and the peer port it sees (the
front's upstream connection: one per client connection when keep-alive works), and ``/stream``
with a chunked response written token by token.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shieldml.broker.client import BrokerClient
from shieldml.files import encrypt_file, generate_key
from shieldml.testing import free_port, start_broker
from tests.conftest import sgx_policy

MRENCLAVE = "5e" * 32

SERVER = """\
import http.server, os, sys, time
PORT = int(sys.argv[1])
MODEL = open("model.bin", "rb").read() if os.path.exists("model.bin") else b""
COUNT = [0]

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        COUNT[0] += 1
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(4):
                tok = f"token {i}\\n".encode()
                self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(tok), tok))
                self.wfile.flush()
                time.sleep(0.15)
            self.wfile.write(b"0\\r\\n\\r\\n")
            return
        body = f"model {len(MODEL)} {MODEL[-12:].decode()} count {COUNT[0]} peer {self.client_address[1]}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", PORT), H).serve_forever()
"""

MODEL = bytes(range(256)) * 16 + b"MODEL-MARK-7"


def write_job(
    d: Path, sim_dir: Path, *, port: int, broker: object | None, debug: bool = False
) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "work").mkdir(exist_ok=True)
    (d / "work" / "server.py").write_text(SERVER)
    digest = hashlib.sha256((d / "work" / "server.py").read_bytes()).hexdigest()
    parts = [
        "version = 1", 'tee = "simulated"', "", "[command]",
        f'argv = ["{sys.executable}", "server.py", "{port}"]', 'cwd = "work"', "",
        "[[trusted]]", 'path = "work/server.py"', f'sha256 = "{digest}"', "",
        "[serve]", f"port = {port}", "ready_timeout = 30", "",
    ]  # fmt: skip
    if broker is not None:
        parts += [
            "[[broker]]", 'name = "owner"', f'url = "{broker.url}"',  # type: ignore[attr-defined]
            f'fingerprint = "{broker.fingerprint}"', "",  # type: ignore[attr-defined]
            "[[input]]", 'path = "model.bin"', 'ciphertext = "enc/model.bin.enc"', 'key = "model"',
            'broker = "owner"', "",
        ]  # fmt: skip
    parts += [
        "[simulated]", f'platform = "{sim_dir}"', 'kind = "sgx"', f'mrenclave = "{MRENCLAVE}"',
        f'debug = "{str(debug).lower()}"',
    ]  # fmt: skip
    m = d / "job.toml"
    m.write_text("\n".join(parts) + "\n")
    return m


def client_policy(digest: str, **extra: str) -> str:
    return sgx_policy(bytes.fromhex(MRENCLAVE), f'["{digest}"]', **extra)


@dataclass
class Served:
    proc: subprocess.Popen[str]
    url: str
    host: str
    port: int
    digest: str
    spki_sha256: str
    manifest: Path
    events: list[dict[str, object]] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if self.reader is not None:
            self.reader.join(10)
        return rc


def start_serve(manifest: Path, *extra: str, wait: bool = True) -> Served:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shieldml.cli", "serve", "-m", str(manifest),
         "--listen", f"127.0.0.1:{port}", "--json", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "500"},
    )  # fmt: skip
    served = Served(proc, f"https://127.0.0.1:{port}", "127.0.0.1", port, "", "", manifest)
    ready = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            served.stderr.append(line)
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            served.events.append(doc)
            if doc.get("event") == "listening":
                served.digest = str(doc["workload_digest"])
                served.spki_sha256 = str(doc["spki_sha256"])
                ready.set()
        proc.stderr.close()
        ready.set()

    served.reader = threading.Thread(target=read, daemon=True)
    served.reader.start()
    if wait:
        ready.wait(60)
        if not served.digest:
            served.stop()
            raise RuntimeError("shieldml serve did not start: " + "".join(served.stderr))
    return served


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, sim_dir: Path) -> Iterator[object]:
    bp = start_broker(tmp_path_factory.mktemp("broker"), "--simulated-platform", str(sim_dir))
    yield bp
    bp.stop()


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, sim_dir: Path, broker: object
) -> Iterator[Served]:
    """The genuine server: model decrypted from the broker's key, under ``shieldml serve``."""
    from shieldml.runner.manifest import JobManifest

    d = tmp_path_factory.mktemp("job")
    m = write_job(d, sim_dir, port=free_port(), broker=broker)
    key = generate_key()
    (d / "enc").mkdir()
    plain = d / "model.plain"
    plain.write_bytes(MODEL)
    encrypt_file(
        str(plain),
        str(d / "enc" / "model.bin.enc"),
        key,
        bind=str((d / "work" / "model.bin").resolve()),
    )
    plain.unlink()
    digest = JobManifest.load(m).workload_digest()
    with BrokerClient(
        broker.url,
        fingerprint=broker.fingerprint,
        token=broker.token_file.read_text().strip(),  # type: ignore[attr-defined]
    ) as c:
        c.add_key("model", "stream", key)
        c.set_policy("model", client_policy(digest))
    s = start_serve(m)
    assert s.digest == digest
    yield s
    s.stop()


@pytest.fixture(scope="module")
def trust(sim_dir: Path):  # type: ignore[no-untyped-def]
    from shieldml.testing.simulated import SimulatedPlatform, system_clock

    return SimulatedPlatform.open(sim_dir, clock=system_clock).trust()


def wait_until(cond, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False
