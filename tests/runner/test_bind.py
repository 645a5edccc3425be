"""Per-input and per-output ``bind``: files that Gramine's own ``pf-crypt`` wrote for relative
stored paths run unchanged under ``shieldml run``, checked as strictly as in-TEE paths are."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shieldml.broker.client import BrokerClient
from shieldml.errors import ManifestError, ViewError
from shieldml.files import encrypt_file, generate_key, open_protected
from shieldml.gramine.manifest import gramine_manifest
from shieldml.runner.manifest import JobManifest
from shieldml.runner.run import run_job
from shieldml.testing.brokers import BrokerProcess, start_broker
from tests.conftest import pf_crypt_tool
from tests.runner.conftest import MRENCLAVE, policy_for

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)

SCRIPT = """\
model = open("model.pt", "rb").read()
classes = open("classes.txt").read().split()
data = open("data.bin", "rb").read()
with open("result.txt", "w") as f:
    f.write(f"{len(model)} {classes[sum(model) % len(classes)]} {data.decode()}")
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, sim_dir: Path) -> Iterator[BrokerProcess]:
    bp = start_broker(tmp_path_factory.mktemp("broker"), "--simulated-platform", str(sim_dir))
    yield bp
    bp.stop()


def admin(bp: BrokerProcess) -> BrokerClient:
    token = bp.token_file.read_text().strip()
    return BrokerClient(bp.url, fingerprint=bp.fingerprint, token=token)


def manifest_text(bp: BrokerProcess | None, sim_dir: Path, tables: str) -> str:
    url, fp = (bp.url, bp.fingerprint) if bp else ("https://127.0.0.1:1", "00" * 32)
    return f"""\
version = 1
tee = "simulated"

[command]
argv = ["{sys.executable}", "infer.py"]
cwd = "app"

[[trusted]]
path = "app/infer.py"
sha256 = "{hashlib.sha256(SCRIPT.encode()).hexdigest()}"

[[broker]]
name = "owner"
url = "{url}"
fingerprint = "{fp}"

[simulated]
platform = "{sim_dir}"
kind = "sgx"
mrenclave = "{MRENCLAVE}"
{tables}"""


def protected(table: str, path: str, ciphertext: str, key: str, fmt: str, bind: str | None) -> str:
    line = f'bind = "{bind}"\n' if bind is not None else ""
    return (
        f'\n[[{table}]]\npath = "{path}"\nciphertext = "{ciphertext}"\n{line}'
        f'key = "{key}"\nbroker = "owner"\nformat = "{fmt}"\n'
    )


def files_under(d: Path) -> dict[str, int]:
    """Every entry under ``d`` (files and directories) with its size."""
    return {str(p.relative_to(d)): p.stat().st_size if p.is_file() else -1 for p in d.rglob("*")}


def pf_crypt(version: str, *args: str, cwd: Path) -> None:
    subprocess.run([str(pf_crypt_tool(version)), *args], cwd=cwd, check=True, capture_output=True)


def gramine_job(tmp_path: Path, bp: BrokerProcess, sim_dir: Path, tag: str) -> tuple[Path, Path]:
    """The Gramine tutorial's layout: the ciphertexts lie in the script's directory under the
    names the script opens, written by Gramine's pf-crypt (v1.8 and v1.9) from there, so their
    stored paths are relative ("model.pt"); one stream input written by `shieldml encrypt`
    with its default bound path (the output path as given). Returns (manifest, wrap key)."""
    app, plain = tmp_path / "app", tmp_path / "plain"
    app.mkdir()
    plain.mkdir()
    (app / "infer.py").write_text(SCRIPT)
    (plain / "model.pt").write_bytes(bytes(range(256)) * 20 + b"MODEL-MARKER")
    (plain / "classes.txt").write_text("cat\ndog\nbird\n")
    (plain / "data.bin").write_bytes(b"DATA-MARKER")
    wrap = tmp_path / "wrap_key"
    pf_crypt("v1.9", "gen-key", "-w", str(wrap), cwd=tmp_path)
    pf_crypt(
        "v1.8", "encrypt", "-w", str(wrap), "-i", "../plain/model.pt", "-o", "model.pt", cwd=app
    )
    pf_crypt("v1.9", "encrypt", "-w", str(wrap), "-i", "../plain/classes.txt", "-o", "classes.txt", cwd=app)  # fmt: skip
    data_key = generate_key()
    cwd = Path.cwd()
    os.chdir(tmp_path)  # `shieldml encrypt plain/data.bin enc/data.bin`: bound to "enc/data.bin"
    try:
        encrypt_file("plain/data.bin", "enc/data.bin", data_key)
    finally:
        os.chdir(cwd)
    with admin(bp) as c:
        c.add_key(f"wrap-{tag}", "gramine-pf", wrap.read_bytes())
        c.add_key(f"data-{tag}", "stream", data_key)
    tables = (
        protected("input", "model.pt", "app/model.pt", f"wrap-{tag}", "gramine-pf", "model.pt")
        + protected(
            "input", "classes.txt", "app/classes.txt", f"wrap-{tag}", "gramine-pf", "classes.txt"
        )
        + protected("input", "data.bin", "enc/data.bin", f"data-{tag}", "stream", "enc/data.bin")
        + protected(
            "output", "result.txt", "app/result.txt", f"wrap-{tag}", "gramine-pf", "result.txt"
        )
    )
    m = tmp_path / "job.toml"
    m.write_text(manifest_text(bp, sim_dir, tables))
    digest = JobManifest.load(m).workload_digest()
    with admin(bp) as c:
        for name in (f"wrap-{tag}", f"data-{tag}"):
            c.set_policy(name, policy_for(digest))
    return m, wrap


@needs_root
def test_pf_crypt_files_with_relative_stored_paths_run_as_they_are(
    tmp_path: Path, broker: BrokerProcess, sim_dir: Path
):
    m, wrap = gramine_job(tmp_path, broker, sim_dir, "ok")
    before = files_under(tmp_path)
    assert run_job(m) == 0
    # no placeholder left beside the job (issue 19): only the sealed output is new, no file empty
    after = files_under(tmp_path)
    assert sorted(set(after) - set(before)) == ["app/result.txt"]
    assert not [p for p, size in after.items() if size == 0]
    # the owner reads the result with Gramine's own tool, checking its stored path (-V)
    app = tmp_path / "app"
    pf_crypt(
        "v1.9", "decrypt", "-V", "-w", str(wrap), "-i", "result.txt", "-o", "../r.txt", cwd=app
    )
    model = bytes(range(256)) * 20 + b"MODEL-MARKER"
    classes = ["cat", "dog", "bird"]
    expected = f"{len(model)} {classes[sum(model) % 3]} DATA-MARKER"
    assert (tmp_path / "r.txt").read_text() == expected
    with open_protected(app / "result.txt", wrap.read_bytes(), bind="result.txt") as f:
        assert f.read().decode() == expected


@needs_root
def test_pf_crypt_file_encrypted_for_another_path_is_swapped_in_and_refused(
    tmp_path: Path, broker: BrokerProcess, sim_dir: Path
):
    m, _wrap = gramine_job(tmp_path, broker, sim_dir, "swap")
    app = tmp_path / "app"
    # the host puts another file of the same owner, under the same key, where model.pt lies
    (app / "model.pt").write_bytes((app / "classes.txt").read_bytes())
    before = files_under(tmp_path)
    with pytest.raises(
        ViewError, match=r"model\.pt.*bound to path 'classes\.txt', not 'model\.pt'"
    ) as refused:
        run_job(m)
    assert not (app / "result.txt").exists()  # the program never ran, nothing was sealed
    assert files_under(tmp_path) == before  # and a refused run leaves nothing behind either
    # the error says what would fix an honest mistake: the manifest's bind, or rebind
    assert "bind in the job manifest" in str(refused.value)
    assert "`shieldml rebind` re-encrypts it for model.pt" in str(refused.value)


def test_bind_is_part_of_the_workload_digest(tmp_path: Path, sim_dir: Path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "infer.py").write_text(SCRIPT)
    m = tmp_path / "job.toml"
    digests = set()
    for bind in (None, "model.pt", "./model.pt", "/srv/model.pt"):
        m.write_text(manifest_text(None, sim_dir, protected("input", "model.pt", "app/model.pt", "k", "gramine-pf", bind)))  # fmt: skip
        digests.add(JobManifest.load(m).workload_digest())
    assert len(digests) == 4


@pytest.mark.parametrize(
    ("first", "second"),
    [("model.pt", "model.pt"), ("model.pt", "./model.pt"), ("data", "data/x"), (None, None)],
)
def test_two_files_bound_to_the_same_path_are_refused(
    tmp_path: Path, sim_dir: Path, first: str | None, second: str | None
):
    """The host could swap two files bound to one path (or one under the other): each would
    authenticate at the other's place."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "infer.py").write_text(SCRIPT)
    a_path, b_path = ("a/", "b") if first == "data" else ("a", "b")
    if first is None:  # an explicit bind equal to another file's in-TEE path
        first, second = None, str((tmp_path / "app" / "a").resolve())
    tables = protected("input", a_path, "x.enc", "k", "gramine-pf", first) + protected(
        "output", b_path, "y.enc", "k", "gramine-pf", second
    )
    m = tmp_path / "job.toml"
    m.write_text(manifest_text(None, sim_dir, tables))
    with pytest.raises(ManifestError, match="could swap their files"):
        JobManifest.load(m)


@pytest.mark.parametrize(
    ("bind", "message"),
    [("", "non-empty path"), ("/", "non-empty path"), ("model.pt/", "ends with '/'"),
     ("x" * 800, "too long")],
)  # fmt: skip
def test_bad_bind_is_refused(tmp_path: Path, sim_dir: Path, bind: str, message: str):
    m = tmp_path / "job.toml"
    m.write_text(manifest_text(None, sim_dir, protected("input", "model.pt", "m", "k", "gramine-pf", bind)))  # fmt: skip
    with pytest.raises(ManifestError, match=message):
        JobManifest.load(m)


def test_recipient_output_takes_no_bind(tmp_path: Path, sim_dir: Path):
    (tmp_path / "r.pub").write_bytes(bytes(32))
    table = (
        '\n[[output]]\npath = "r.txt"\nciphertext = "r.enc"\nrecipient = "r.pub"\nbind = "r.txt"\n'
    )
    m = tmp_path / "job.toml"
    m.write_text(manifest_text(None, sim_dir, table))
    with pytest.raises(ManifestError, match="bind goes with a broker key"):
        JobManifest.load(m)


def test_gramine_manifest_refuses_a_bind_gramine_would_not_accept(tmp_path: Path, sim_dir: Path):
    """Under Gramine a protected file opens only if bound to its mount's uri (the ciphertext's
    host path): a job bound elsewhere would fail inside the enclave, so it is refused here."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "infer.py").write_text(SCRIPT)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    m = tmp_path / "job.toml"
    ct = str(tmp_path / "app" / "model.pt")
    for bind, ok in (("model.pt", False), (ct, True), (None, True)):
        m.write_text(manifest_text(None, sim_dir, protected("input", "model.pt", ct, "k", "gramine-pf", bind)))  # fmt: skip
        if ok:
            assert 'type = "encrypted"' in gramine_manifest(JobManifest.load(m), broker_ca=ca)
        else:
            with pytest.raises(ManifestError, match="Gramine opens it at"):
                gramine_manifest(JobManifest.load(m), broker_ca=ca)


@needs_root
def test_fifo_in_place_of_an_input_is_refused_not_waited_on(
    tmp_path: Path, broker: BrokerProcess, sim_dir: Path
):
    """The host puts a FIFO (or a device) where a ciphertext lies: refused at once, naming it."""
    m, _wrap = gramine_job(tmp_path, broker, sim_dir, "fifo")
    (tmp_path / "app" / "classes.txt").unlink()
    os.mkfifo(tmp_path / "app" / "classes.txt")
    with pytest.raises(ViewError, match=r"classes\.txt: not a regular file"):
        run_job(m)
    assert not (tmp_path / "app" / "result.txt").exists()


def children() -> list[int]:
    """Processes whose parent is this one (read from /proc)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat_line = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat_line.rsplit(")", 1)[1].split()[1]) == me:
                found.append(int(entry.name))
    return found


@needs_root
def test_refused_release_ends_the_view_started_before_it(
    tmp_path: Path, broker: BrokerProcess, sim_dir: Path
):
    """The view starts before the brokers answer, and holds no key then: a refusal ends it,
    nothing is decrypted, nothing is left behind."""
    from shieldml.errors import PolicyDenied

    m, _wrap = gramine_job(tmp_path, broker, sim_dir, "refused")
    with admin(broker) as c:
        c.set_policy("wrap-refused", policy_for("sha256:" + "00" * 32))
    before, running = files_under(tmp_path), children()
    with pytest.raises(PolicyDenied):
        run_job(m)
    assert children() == running  # the view was ended and reaped
    assert files_under(tmp_path) == before
