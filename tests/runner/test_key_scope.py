"""Keys belong to the broker that holds them: one owner's broker can never fill another's key.

Attacks (issue 12, point 1): a data owner's broker answers a release with an extra key named like
the model owner's (sealed to the runner's HPKE key, so it opens); two honest brokers hold keys of
the same name; a broker omits a key or holds it in another format. The hostile broker below is the
attacker's own server (it speaks the broker's HTTP protocol and seals with the real HPKE code);
the honest owner's broker is the real one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from shieldml.broker import protocol
from shieldml.broker.client import BrokerClient
from shieldml.errors import BrokerError
from shieldml.files import generate_key, key_id, open_protected
from shieldml.policy import Policy
from shieldml.runner.manifest import JobManifest
from shieldml.runner.receipt import verify_receipt
from shieldml.runner.run import run_job
from shieldml.testing.brokers import start_broker
from tests.runner.conftest import Job, encrypt_file_plain, policy_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)

APP = """\
import pathlib
pathlib.Path("result.txt").write_text("model owner's result: " + open("model.bin").read())
pathlib.Path("data-result.txt").write_text("data owner's result: " + open("data.txt").read())
"""


class HostileBroker(ThreadingHTTPServer):
    """A broker run by the data owner that answers for keys it was never asked for."""

    def __init__(self, owned: dict[str, bytes], extra: dict[str, bytes], omit: tuple[str, ...]):
        self.owned, self.extra, self.omit = owned, extra, omit
        self.released: list[list[str]] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: HostileBroker

    def log_message(self, *_: Any) -> None:
        pass

    def _answer(self, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        req = json.loads(self.rfile.read(length) or b"{}")
        if self.path == "/v1/challenge":
            self._answer({"nonce": os.urandom(protocol.NONCE_SIZE).hex()})
            return
        kem = protocol.KEMS[req["hpke_kem"]]
        pub = base64.b64decode(req["hpke_public_key"])
        self.server.released.append(req["keys"])
        chosen = {n: self.server.owned[n] for n in req["keys"] if n not in self.server.omit}
        chosen.update(self.server.extra)
        keys = {
            n: {
                "format": "stream",
                "sealed": base64.b64encode(protocol.seal(kem, pub, n, k)).decode(),
            }
            for n, k in chosen.items()
        }
        self._answer({"keys": keys, "audit_seq": 1, "tee": "sgx"})


@contextlib.contextmanager
def hostile(
    owned: dict[str, bytes], extra: dict[str, bytes] | None = None, omit: tuple[str, ...] = ()
) -> Iterator[HostileBroker]:
    srv = HostileBroker(owned, extra or {}, omit)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def two_owner_job(
    job: Job, data_owner_url: str, data_owner_fp: str | None, *, data_output: bool
) -> bytes:
    """The model owner's broker (``owner``: keys model, results) and a data owner's broker
    (``dataowner``: data and, with ``data_output``, its own ``results``). Returns the data key."""
    work = (job.dir / "work").resolve()
    (work / "app.py").write_text(
        APP if data_output else APP.splitlines(True)[1] + APP.splitlines(True)[0]
    )
    data_key = generate_key()
    encrypt_file_plain(
        job.dir / "m.plain", b"MODEL", job.dir / "enc" / "model.enc", job.model_key,
        str(work / "model.bin"),
    )  # fmt: skip
    encrypt_file_plain(
        job.dir / "d.plain", b"DATA", job.dir / "enc" / "data.enc", data_key, str(work / "data.txt")
    )
    text = job.manifest.read_text()
    head, _, tail = text.partition("[[input]]")
    sim = tail[tail.index("[simulated]") :]
    digest_line = next(ln for ln in head.splitlines() if ln.startswith("sha256"))
    head = head.replace(
        digest_line, f'sha256 = "{hashlib.sha256((work / "app.py").read_bytes()).hexdigest()}"'
    )
    fp = f'fingerprint = "{data_owner_fp}"\n' if data_owner_fp else ""
    data_out = (
        '[[output]]\npath = "data-result.txt"\nciphertext = "out/data-result.enc"\nkey = "results"\nbroker = "dataowner"\n\n'
        if data_output
        else ""
    )
    job.manifest.write_text(
        head
        + f'[[broker]]\nname = "dataowner"\nurl = "{data_owner_url}"\n{fp}\n'
        + '[[input]]\npath = "model.bin"\nciphertext = "enc/model.enc"\nkey = "model"\nbroker = "owner"\n\n'
        + '[[input]]\npath = "data.txt"\nciphertext = "enc/data.enc"\nkey = "data"\nbroker = "dataowner"\n\n'
        + '[[output]]\npath = "result.txt"\nciphertext = "out/result.enc"\nkey = "results"\nbroker = "owner"\n\n'
        + data_out
        + sim
    )
    digest = JobManifest.load(job.manifest).workload_digest()
    with job.admin() as c:
        for name in ("model", "results"):
            c.set_policy(name, policy_for(digest))
    return data_key


@pytest.mark.parametrize("stolen", ["results", "model"])
def test_other_owners_broker_cannot_replace_a_key_by_name(job: Job, stolen: str):
    """The data owner's broker also answers for the model owner's ``results`` (or ``model``), a
    key of its own sealed to the runner, so it opens. On main it replaced the model owner's key:
    the model owner's result was sealed under the data owner's key and read by them."""
    attacker_key = generate_key()
    with hostile({"data": generate_key()}, extra={stolen: attacker_key}) as srv:
        two_owner_job(job, srv.url, None, data_output=False)
        with pytest.raises(BrokerError, match=rf"keys not asked for: '{stolen}'"):
            run_job(job.manifest)
        assert srv.released == [["data"]]
    assert not (job.dir / "out").exists(), "nothing may be sealed after a refused release"


def test_broker_that_omits_a_key_is_refused_before_the_program_starts(job: Job):
    with hostile({"data": generate_key()}, omit=("data",)) as srv:
        two_owner_job(job, srv.url, None, data_output=False)
        with pytest.raises(BrokerError, match=r"keys missing: 'data'"):
            run_job(job.manifest)
    assert not (job.dir / "out").exists()


def test_two_honest_brokers_with_the_same_key_name_keep_their_own(job: Job, tmp_path: Path):
    """Both owners call their output key ``results``: each output is sealed under its owner's."""
    other = start_broker(tmp_path / "dataowner", "--simulated-platform", str(job.sim_dir))
    try:
        data_key = two_owner_job(job, other.url, other.fingerprint, data_output=True)
        data_results = generate_key()
        digest = JobManifest.load(job.manifest).workload_digest()
        with BrokerClient(
            other.url, fingerprint=other.fingerprint, token=other.token_file.read_text().strip()
        ) as c:
            c.add_key("data", "stream", data_key)
            c.add_key("results", "stream", data_results)
            for name in ("data", "results"):
                c.set_policy(name, policy_for(digest))
        receipt = job.dir / "receipt.json"
        assert run_job(job.manifest, receipt=str(receipt)) == 0
    finally:
        other.stop()
    work = (job.dir / "work").resolve()
    with open_protected(
        job.dir / "out" / "result.enc", job.result_key, bind=str(work / "result.txt")
    ) as f:
        assert f.read() == b"model owner's result: MODEL"
    with open_protected(
        job.dir / "out" / "data-result.enc", data_results, bind=str(work / "data-result.txt")
    ) as f:
        assert f.read() == b"data owner's result: DATA"
    # the receipt says which owner's key sealed which output
    from shieldml.testing.simulated import SimulatedPlatform, system_clock

    trust = SimulatedPlatform.open(job.sim_dir, clock=system_clock).trust()
    outputs = {
        o["path"]: o["sealed_by"]
        for o in verify_receipt(
            str(receipt), policy=Policy.from_toml(policy_for(digest)), trust=trust
        ).body["outputs"]
    }
    assert outputs == {
        str(work / "result.txt"): {"broker": "owner", "key": "results", "key_id": key_id(job.result_key).hex()},
        str(work / "data-result.txt"): {"broker": "dataowner", "key": "results", "key_id": key_id(data_results).hex()},
    }  # fmt: skip


def test_key_of_another_format_is_refused_before_the_program_starts(job: Job):
    with job.admin() as c:
        c.add_key("results", "gramine-pf", replace=True)
    job.authorize()
    with pytest.raises(
        BrokerError, match="'results' is a gramine-pf key, the job uses it as stream"
    ):
        run_job(job.manifest)
    assert not (job.dir / "out").exists()


def test_receipt_verify_names_the_key_that_sealed_each_output(
    job: Job, capsys: pytest.CaptureFixture[str]
):
    from shieldml.cli import main

    (job.dir / "policy.toml").write_text(policy_for(job.authorize()))
    receipt = job.dir / "receipt.json"
    assert run_job(job.manifest, receipt=str(receipt)) == 0
    capsys.readouterr()
    rc = main([
        "receipt", "verify", str(receipt), "--policy", str(job.dir / "policy.toml"),
        "--simulated-platform", str(job.sim_dir),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"key 'results' of broker 'owner' (key id {key_id(job.result_key).hex()})" in out
