"""torchrun data-parallel training across two shielded nodes on loopback, one PostgreSQL broker."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest

from shieldml.broker.client import BrokerClient
from shieldml.files import encrypt_file, generate_key, open_protected
from shieldml.runner.manifest import JobManifest
from shieldml.runner.run import run_job
from shieldml.testing.brokers import start_broker
from tests.runner.conftest import MRENCLAVE, policy_for

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)
SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "multinode" / "train_ddp.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_manifest(d: Path, rank: int, port: int, broker: object, sim_dir: Path) -> Path:
    b = broker
    # One process per node, started the way torchrun starts its workers (env:// rendezvous). The
    # torchrun agent itself is left out: its exit barrier is flaky on a loaded 2-core loopback.
    argv = [sys.executable, "train_ddp.py"]
    env = f'MASTER_ADDR = "127.0.0.1"\nMASTER_PORT = "{port}"\nRANK = "{rank}"\nWORLD_SIZE = "2"\nLOCAL_RANK = "0"\n'
    outputs = (
        '[[output]]\npath = "model/"\nciphertext = "enc/model"\nkey = "model"\nbroker = "owner"\n'
        if rank == 0
        else ""
    )
    text = (
        f'tee = "simulated"\n[command]\nargv = {argv!r}\ncwd = "work"\n'.replace("'", '"')
        + '[env]\nallow = ["LANG"]\n[env.set]\n'
        + env
        + f'[[trusted]]\npath = "work/train_ddp.py"\nsha256 = "{hashlib.sha256((d / "work" / "train_ddp.py").read_bytes()).hexdigest()}"\n'
        + f'[[broker]]\nname = "owner"\nurl = "{b.url}"\nfingerprint = "{b.fingerprint}"\n'  # type: ignore[attr-defined]
        + f'[[input]]\npath = "data/shard.pt"\nciphertext = "enc/shard{rank}.pt.enc"\nkey = "shard{rank}"\nbroker = "owner"\n'
        + outputs
        + f'[simulated]\nplatform = "{sim_dir}"\nkind = "sgx"\nmrenclave = "{MRENCLAVE}"\n'
    )
    m = d / "job.toml"
    m.write_text(text)
    return m


def test_two_shielded_nodes(tmp_path: Path, sim_dir: Path, pg_url: str):
    broker = start_broker(
        tmp_path / "broker", "--simulated-platform", str(sim_dir), database=pg_url
    )
    try:
        keys = {"shard0": generate_key(), "shard1": generate_key(), "model": generate_key()}
        torch.manual_seed(1)
        x = torch.randn(64, 8)
        y = x.sum(dim=1, keepdim=True)
        port = free_port()
        manifests = []
        for rank in (0, 1):
            d = tmp_path / f"node{rank}"
            (d / "work").mkdir(parents=True)
            shutil.copy(SCRIPT, d / "work" / "train_ddp.py")
            plain = tmp_path / f"shard{rank}.pt"
            torch.save({"x": x[rank::2], "y": y[rank::2]}, plain)
            encrypt_file(
                plain,
                d / "enc" / f"shard{rank}.pt.enc",
                keys[f"shard{rank}"],
                bind=str((d / "work" / "data" / "shard.pt").resolve()),
            )
            manifests.append(node_manifest(d, rank, port, broker, sim_dir))
        digests = [JobManifest.load(m).workload_digest() for m in manifests]
        with BrokerClient(
            broker.url, fingerprint=broker.fingerprint, token=broker.token_file.read_text().strip()
        ) as c:
            for name, key in keys.items():
                c.add_key(name, "stream", key)
            c.set_policy("shard0", policy_for(digests[0]))
            c.set_policy("shard1", policy_for(digests[1]))
            c.set_policy("model", policy_for(digests[0]))
        results: dict[int, int] = {}
        errors: list[BaseException] = []

        def node(rank: int) -> None:
            try:
                results[rank] = run_job(manifests[rank])
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors and results == {0: 0, 1: 0}, (errors, results)
        model = tmp_path / "node0" / "enc" / "model" / "model.pt"
        with open_protected(
            model,
            keys["model"],
            bind=str((tmp_path / "node0" / "work" / "model" / "model.pt").resolve()),
        ) as f:
            state = torch.load(__import__("io").BytesIO(f.read()), weights_only=True)
        assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        # node 1 never received node 0's shard key, and vice versa
        with BrokerClient(
            broker.url, fingerprint=broker.fingerprint, token=broker.token_file.read_text().strip()
        ) as c:
            released = sorted(
                tuple(r["data"]["keys"])
                for r in c.audit_all()[0]
                if r["event"] == "release" and r["data"].get("allowed")
            )
        assert released == [("model", "shard0"), ("shard1",)]
    finally:
        broker.stop()
