"""The runner end to end: simulated TEE, broker on loopback, a private mount namespace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shieldml.errors import ReceiptError, ReleaseDenied, ShieldError, TrustedFileError
from shieldml.files import open_protected
from shieldml.policy import Policy
from shieldml.runner.receipt import verify_receipt
from shieldml.runner.run import run_job
from tests.runner.conftest import Job

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)


def test_run_decrypts_runs_and_seals(job: Job):
    digest = job.authorize()
    receipt = job.dir / "receipt.json"
    assert run_job(job.manifest, receipt=str(receipt)) == 0
    work = job.dir / "work"
    out = job.dir / "out" / "result.txt.enc"
    with open_protected(out, job.result_key, bind=str((work / "result.txt").resolve())) as f:
        assert (
            f.read().decode()
            == f"16401 {sum(bytes(range(256)) * 64 + b'MODEL-MARKER-1234') % 9973} HELLO SHIELDED WORLD INPUT-MARKER"
        )
    # the protected paths live in the program's private root only: nothing on the host's side
    for name in ("model.bin", "input.txt", "result.txt"):
        assert not (work / name).exists()
    for p in job.dir.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert (
                b"MODEL-MARKER" not in data
                and b"INPUT-MARKER" not in data
                and b"HELLO SHIELDED" not in data
            ), p
    from shieldml.testing.simulated import SimulatedPlatform, system_clock

    result = verify_receipt(
        str(receipt),
        policy=Policy.from_toml(job.policy(digest)),
        trust=SimulatedPlatform.open(job.sim_dir, clock=system_clock).trust(),
    )
    assert result.files_checked and result.body["exit_code"] == 0


def test_exit_code_passes_through(job: Job):
    # the job's input says "fail": the script exits 3
    from tests.runner.conftest import encrypt_file_plain

    work = (job.dir / "work").resolve()
    encrypt_file_plain(
        job.dir / "x",
        b"fail",
        job.dir / "enc" / "input.txt.enc",
        job.model_key,
        str(work / "input.txt"),
    )
    job.authorize()
    assert run_job(job.manifest) == 3


def test_changed_script_is_refused_before_anything(job: Job):
    job.authorize()
    (job.dir / "work" / "app.py").write_text("print('evil')\n")
    with pytest.raises(TrustedFileError, match=r"app\.py"):
        run_job(job.manifest)
    assert not (job.dir / "out").exists()


def test_policy_for_another_digest_is_refused_with_verdict(job: Job):
    with job.admin() as c:
        c.set_policy("model", job.policy("sha256:" + "00" * 32))
        c.set_policy("results", job.policy("sha256:" + "00" * 32))
    with pytest.raises(ReleaseDenied) as e:
        run_job(job.manifest)
    assert "workload_digest" in str(e.value.detail)
    assert not (job.dir / "out").exists()


def test_tampered_model_stops_before_the_program(job: Job):
    job.authorize()
    enc = job.dir / "enc" / "model.bin.enc"
    raw = bytearray(enc.read_bytes())
    raw[500] ^= 1
    enc.write_bytes(bytes(raw))
    with pytest.raises(ShieldError, match=r"not started.*model.bin.enc"):
        run_job(job.manifest)
    assert not (job.dir / "out").exists()


def test_unreachable_broker(job: Job):
    job.authorize()
    job.broker.stop()
    with pytest.raises(ShieldError, match="cannot reach"):
        run_job(job.manifest)


def test_debug_tee_is_refused(job: Job):
    text = job.manifest.read_text().replace('debug = "false"', 'debug = "true"')
    job.manifest.write_text(text)
    job.authorize()
    with pytest.raises(ReleaseDenied) as e:
        run_job(job.manifest)
    assert '"name": "debug"' in json_dump(e.value.detail) and not (job.dir / "out").exists()


def test_simulated_root_needs_the_insecure_switch(job: Job):
    digest = job.authorize()
    with job.admin() as c:
        c.set_policy("model", job.policy(digest).replace("insecure_allow_simulated = true\n", ""))
    with pytest.raises(ReleaseDenied) as e:
        run_job(job.manifest)
    assert '"name": "root"' in json_dump(e.value.detail)


def test_sigkill_of_the_runner_leaves_no_plaintext_and_no_partial_output(job: Job):
    import signal
    import subprocess
    import sys
    import time

    (job.dir / "work" / "app.py").write_text(
        "import time\nopen('result.txt','w').write(open('input.txt').read() * 1000)\ntime.sleep(60)\n"
    )
    text = job.manifest.read_text()
    import hashlib

    old = text.split('sha256 = "')[1].split('"')[0]
    job.manifest.write_text(
        text.replace(old, hashlib.sha256((job.dir / "work" / "app.py").read_bytes()).hexdigest())
    )
    job.authorize()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shieldml.cli", "run", "-m", str(job.manifest)],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _program_running(proc.pid):
            time.sleep(0.2)
        assert _program_running(proc.pid), "the program never started"
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(1.0)
    assert not _any_program_running()  # wherever it went (a program may leave the session)
    assert not (job.dir / "out").exists()  # nothing sealed, nothing half-written
    for p in job.dir.rglob("*"):
        if p.is_file():
            assert b"INPUT-MARKER" not in p.read_bytes(), p


def _program_running(runner_pid: int) -> bool:
    """Whether the job's program runs in the session the runner was started in (its process
    group and session survive the runner's death; other tests' programs are not counted)."""
    import subprocess

    out = subprocess.run(
        ["ps", "-eo", "sid,args"], capture_output=True, text=True, check=True
    ).stdout
    return any(
        line.split(None, 1)[0] == str(runner_pid) and "app.py" in line and "shieldml" not in line
        for line in out.splitlines()[1:]
    )


def _any_program_running() -> bool:
    import subprocess

    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return any("app.py" in line and "shieldml" not in line for line in out.splitlines())


def json_dump(x: object) -> str:
    import json

    return json.dumps(x)


def test_two_owners_directories_and_signals(tmp_path: Path, sim_dir: Path):
    """A model owner and a data owner, each with their own broker and key; directory input and
    output; SIGTERM to the runner reaches the program and its outputs are still sealed."""
    import signal
    import subprocess
    import sys
    import time

    from shieldml.broker.client import BrokerClient
    from shieldml.files import encrypt_path, generate_key
    from shieldml.runner.manifest import JobManifest
    from shieldml.testing.brokers import start_broker

    owners = {
        name: start_broker(tmp_path / name, "--simulated-platform", str(sim_dir))
        for name in ("model", "data")
    }
    try:
        d = tmp_path / "job"
        (d / "work").mkdir(parents=True)
        (d / "plain" / "images").mkdir(parents=True)
        for i in range(3):
            (d / "plain" / "images" / f"{i}.txt").write_text(f"image {i} DATA-MARKER")
        (d / "plain" / "weights.bin").write_bytes(b"W" * 1000)
        keys = {"model": generate_key(), "data": generate_key(), "preds": generate_key()}
        work = (d / "work").resolve()
        encrypt_path(
            d / "plain" / "images", d / "enc" / "images", keys["data"], bind=str(work / "images")
        )
        encrypt_path(
            d / "plain" / "weights.bin",
            d / "enc" / "weights.bin.enc",
            keys["model"],
            bind=str(work / "weights.bin"),
        )
        (d / "work" / "app.py").write_text(
            "import os, signal, sys, time\n"
            "def stop(*_):\n"
            "    open('preds/summary.txt', 'w').write('stopped ' + str(len(open('weights.bin','rb').read())))\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "for n in sorted(os.listdir('images')):\n"
            "    open(f'preds/{n}', 'w').write(open(f'images/{n}').read().upper())\n"
            "open('ready', 'w').close() if False else None\n"
            "time.sleep(60)\n"
        )
        import hashlib

        def broker_block(name: str) -> str:
            b = owners[name]
            return (
                f'[[broker]]\nname = "{name}"\nurl = "{b.url}"\nfingerprint = "{b.fingerprint}"\n'
            )

        m = d / "job.toml"
        m.write_text(
            f'tee = "simulated"\n[command]\nargv = ["{sys.executable}", "app.py"]\ncwd = "work"\n'
            f'[[trusted]]\npath = "work/app.py"\nsha256 = "{hashlib.sha256((d / "work" / "app.py").read_bytes()).hexdigest()}"\n'
            + broker_block("model") + broker_block("data")
            + '[[input]]\npath = "weights.bin"\nciphertext = "enc/weights.bin.enc"\nkey = "model"\nbroker = "model"\n'
            + '[[input]]\npath = "images/"\nciphertext = "enc/images"\nkey = "data"\nbroker = "data"\n'
            + '[[output]]\npath = "preds/"\nciphertext = "out/preds"\nkey = "preds"\nbroker = "data"\n'
            + f'[simulated]\nplatform = "{sim_dir}"\nkind = "sgx"\nmrenclave = "{"7e" * 32}"\n'
        )  # fmt: skip
        digest = JobManifest.load(m).workload_digest()
        from tests.runner.conftest import policy_for

        policy = policy_for(digest)
        for owner, names in (("model", ["model"]), ("data", ["data", "preds"])):
            b = owners[owner]
            with BrokerClient(
                b.url, fingerprint=b.fingerprint, token=b.token_file.read_text().strip()
            ) as c:
                for n in names:
                    c.add_key(n, "stream", keys[n])
                    c.set_policy(n, policy)
        proc = subprocess.Popen([sys.executable, "-m", "shieldml.cli", "run", "-m", str(m)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _any_program_running():
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        from shieldml.files import decrypt_path

        decrypt_path(
            d / "out" / "preds", tmp_path / "preds", keys["preds"], bind=str(work / "preds")
        )
        got = {p.name: p.read_text() for p in (tmp_path / "preds").iterdir()}
        assert got["summary.txt"] == "stopped 1000"
        assert got["0.txt"] == "IMAGE 0 DATA-MARKER"
        for p in d.rglob("*"):
            if p.is_file() and "plain" not in p.parts:
                assert b"DATA-MARKER" not in p.read_bytes(), p
        # each owner's audit shows only its own keys
        with BrokerClient(
            owners["model"].url,
            fingerprint=owners["model"].fingerprint,
            token=owners["model"].token_file.read_text().strip(),
        ) as c:
            releases = [r for r in c.audit_all()[0] if r["event"] == "release"]
        assert [r["data"]["keys"] for r in releases] == [["model"]]
    finally:
        for b in owners.values():
            b.stop()


def test_output_sealed_to_a_recipient(job: Job, capsys: pytest.CaptureFixture[str]):
    from shieldml.cli import main

    rec = job.dir / "recipient.key"
    assert main(["key", "recipient", str(rec)]) == 0
    text = job.manifest.read_text().replace(
        'ciphertext = "out/result.txt.enc"\nkey = "results"\nbroker = "owner"',
        'ciphertext = "out/result.txt.enc"\nrecipient = "recipient.key.pub"',
    )
    assert "recipient.key.pub" in text
    job.manifest.write_text(text)
    digest = job.authorize()
    receipt = job.dir / "run.receipt"
    assert run_job(job.manifest, receipt=str(receipt)) == 0
    work = (job.dir / "work").resolve()
    out = job.dir / "out" / "result.txt.enc"
    assert (job.dir / "out" / "result.txt.enc.sealed-key").exists()
    plain = job.dir / "result.txt"
    policy = job.dir / "owner-policy.toml"
    policy.write_text(job.policy(digest))
    args = [
        "decrypt",
        str(out),
        str(plain),
        "--recipient-key",
        str(rec),
        "--bind",
        str(work / "result.txt"),
        "--receipt",
        str(receipt),
        "--policy",
        str(policy),
        "--simulated-platform",
        str(job.sim_dir),
    ]
    assert main(args[:5]) == 2  # a recipient output opens only with the run's receipt
    assert "needs --receipt and --policy" in capsys.readouterr().err
    assert main(args) == 0
    assert plain.read_text().endswith("HELLO SHIELDED WORLD INPUT-MARKER")
    capsys.readouterr()
    other = job.dir / "other.key"
    main(["key", "recipient", str(other)])
    assert (
        main([*args[:4], str(other), *args[5:], "--force"]) == 3
    )  # another recipient: integrity error
    # swapping the recipient key in the manifest changes the workload digest
    from shieldml.runner.manifest import JobManifest

    before = JobManifest.load(job.manifest).workload_digest()
    job.manifest.write_text(job.manifest.read_text().replace("recipient.key.pub", "other.key.pub"))
    assert JobManifest.load(job.manifest).workload_digest() != before


def test_pinned_input_refuses_an_older_version(job: Job):
    """Rollback protection: the manifest (and so the digest the policy pins) names the ciphertext."""
    from shieldml.runner.manifest import ciphertext_digest
    from tests.runner.conftest import encrypt_file_plain

    enc = job.dir / "enc" / "input.txt.enc"
    old = enc.read_bytes()  # version 1, validly encrypted
    work = (job.dir / "work").resolve()
    encrypt_file_plain(
        job.dir / "x", b"version 2 INPUT-MARKER", enc, job.model_key, str(work / "input.txt")
    )
    pin = ciphertext_digest(enc)
    job.manifest.write_text(
        job.manifest.read_text().replace(
            'ciphertext = "enc/input.txt.enc"',
            f'ciphertext = "enc/input.txt.enc"\nsha256 = "{pin}"',
        )
    )
    job.authorize()
    assert run_job(job.manifest) == 0
    enc.write_bytes(old)  # the host substitutes the older, still valid ciphertext
    with pytest.raises(ShieldError, match="not the ciphertext the job pins"):
        run_job(job.manifest)


def test_data_key_rotation_keeps_old_receipts_verifiable(job: Job):
    """Rotate the model key end to end: `shieldml rekey` the inputs, replace the key at the
    broker; the job runs on the new ciphertexts, the old key opens nothing, and the receipt of the
    run before the rotation still verifies (its file digests name the old ciphertexts)."""
    from shieldml.cli import main
    from shieldml.errors import WrongKeyError
    from shieldml.files import generate_key, write_key_file
    from shieldml.testing.simulated import SimulatedPlatform, system_clock

    pol = Policy.from_toml(job.policy(job.authorize()))
    before, after = job.dir / "before.json", job.dir / "after.json"
    out = job.dir / "out" / "result.txt.enc"
    work = (job.dir / "work").resolve()
    assert run_job(job.manifest, receipt=str(before)) == 0
    result_before = open_protected(out, job.result_key, bind=str(work / "result.txt")).read()

    new = generate_key()
    write_key_file(job.dir / "old.key", job.model_key)
    write_key_file(job.dir / "new.key", new)
    for name in ("model.bin", "input.txt"):
        assert main([
            "rekey", str(job.dir / "enc" / f"{name}.enc"), "--key", str(job.dir / "old.key"),
            "--new-key", str(job.dir / "new.key"), "--bind", str(work / name),
        ]) == 0  # fmt: skip
    with job.admin() as c:
        c.add_key("model", "stream", new, replace=True)
    with pytest.raises(WrongKeyError):
        open_protected(
            job.dir / "enc" / "model.bin.enc", job.model_key, bind=str(work / "model.bin")
        )

    assert run_job(job.manifest, receipt=str(after)) == 0
    assert (
        open_protected(out, job.result_key, bind=str(work / "result.txt")).read() == result_before
    )

    trust = SimulatedPlatform.open(job.sim_dir, clock=system_clock).trust()
    old = verify_receipt(str(before), policy=pol, trust=trust, check_files=False)
    assert old.body["exit_code"] == 0
    # the inputs were re-encrypted since
    with pytest.raises(ReceiptError) as differ:
        verify_receipt(str(before), policy=pol, trust=trust)
    assert differ.value.verified is not None
    assert sorted(Path(p.split(":")[0]).name for p in differ.value.problems) == [
        "input.txt.enc", "model.bin.enc", "result.txt.enc",
    ]  # fmt: skip
    verify_receipt(str(after), policy=pol, trust=trust)


# -- issue 12: the host sets env, argv[0]'s lookup and the hash cache ----------------------------


def _rewrite(job: Job, *, argv0: str | None = None, allow: list[str] | None = None) -> None:
    import json
    import re

    text = job.manifest.read_text()
    if argv0 is not None:
        text = re.sub(r'argv = \["[^"]*"', f"argv = [{json.dumps(argv0)}", text, count=1)
    if allow is not None:
        text = re.sub(r"(?m)^allow = \[.*\]$", f"allow = {json.dumps(allow)}", text, count=1)
    job.manifest.write_text(text)


def test_bare_interpreter_with_host_path_in_env_allow_is_refused(
    job: Job, monkeypatch: pytest.MonkeyPatch
):
    # the attack: `argv = ["python3", …]` and `allow = ["PATH", …]` (the old scaffold), then the
    # host starts the run with PATH=evil:$PATH: its python3 got the decrypted view
    marker = job.dir / "pwned"
    evil = job.dir / "evil"
    evil.mkdir()
    (evil / "python3").write_text(f"#!/bin/sh\necho pwned > {marker}\n")
    (evil / "python3").chmod(0o755)
    monkeypatch.setenv("PATH", f"{evil}:{os.environ['PATH']}")
    _rewrite(job, argv0="python3", allow=["PATH", "LANG"])
    from shieldml.errors import ManifestError

    with pytest.raises(ManifestError, match=r"argv\[0\]|PATH"):
        job.authorize()
        run_job(job.manifest)
    assert not marker.exists() and not (job.dir / "out").exists()


def test_home_with_a_pth_file_in_env_allow_is_refused(job: Job, monkeypatch: pytest.MonkeyPatch):
    # the attack: HOME passed through, the host points it at a directory whose user
    # site-packages holds a .pth file: Python runs its `import` line before the trusted script
    import subprocess
    import sys

    python = getattr(sys, "_base_executable", sys.executable)  # a venv turns the user site off
    marker = job.dir / "pwned"
    home = job.dir / "evilhome"
    site = subprocess.run(
        [python, "-c", "import site; print(site.getusersitepackages())"],
        env={"HOME": str(home)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site).mkdir(parents=True)
    (Path(site) / "evil.pth").write_text(f"import os; open({str(marker)!r}, 'w').write('pwned')\n")
    monkeypatch.setenv("HOME", str(home))
    _rewrite(job, argv0=python, allow=["HOME", "LANG"])
    from shieldml.errors import ManifestError

    with pytest.raises(ManifestError, match="HOME"):
        job.authorize()
        run_job(job.manifest)
    assert not marker.exists() and not (job.dir / "out").exists()


def test_edited_script_with_same_size_and_mtime_gets_a_new_digest_in_run(job: Job):
    # the attack: the host keeps a --hash-cache keyed by (size, mtime, inode), edits app.py in
    # place with as many bytes and puts its mtime back: `shieldml run` took the cached digest
    from shieldml.cli import main
    from shieldml.runner.manifest import HashCache, JobManifest

    digest = job.authorize()
    cache = job.dir / "hashes.json"
    assert main(["job", "measure", str(job.manifest), "--hash-cache", str(cache)]) == 0
    app = job.dir / "work" / "app.py"
    before = app.stat()
    marker = job.dir / "pwned"
    evil = f"open({str(marker)!r}, 'w').write(open('input.txt').read())\n"
    old = app.read_bytes()
    evil_bytes = (evil + "#" * (len(old) - len(evil) - 1) + "\n").encode()
    assert len(evil_bytes) == len(old)
    with open(app, "r+b") as f:  # same inode
        f.write(evil_bytes)
    os.utime(app, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = app.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    # the cache (the owner's convenience for `job measure`) still answers the old digest ...
    assert JobManifest.load(job.manifest).workload_digest(HashCache(cache)) == digest
    # ... but `shieldml run` hashes every trusted file in full, whatever the host hands it
    assert main(["run", "-m", str(job.manifest), "--hash-cache", str(cache)]) != 0
    with pytest.raises(TrustedFileError, match=r"app\.py"):
        run_job(job.manifest)
    assert not marker.exists() and not (job.dir / "out").exists()
    # even with the manifest's pin updated to the edited script, the digest is a new one
    import hashlib

    text = job.manifest.read_text()
    job.manifest.write_text(
        text.replace(hashlib.sha256(old).hexdigest(), hashlib.sha256(evil_bytes).hexdigest())
    )
    assert JobManifest.load(job.manifest).workload_digest() != digest
    from shieldml.errors import PolicyDenied as Denied

    with pytest.raises(Denied):
        run_job(job.manifest)  # the owners' policies pin the old digest
    assert not marker.exists() and not (job.dir / "out").exists()


def test_input_swapped_while_the_program_runs_does_not_change_the_receipts_digest(job: Job):
    """The host replaces an (unpinned) input's ciphertext with another valid one while the
    program runs: the receipt states the digest of the bytes that were decrypted, not of the
    file the host put back, and the owner's check of the files then notices the swap."""
    import hashlib
    import threading
    import time

    from shieldml.runner.manifest import sha256_file
    from shieldml.testing.simulated import SimulatedPlatform, system_clock
    from tests.runner.conftest import encrypt_file_plain

    (job.dir / "work" / "app.py").write_text(
        "import time\nopen('result.txt','w').write(open('input.txt').read())\ntime.sleep(4)\n"
    )
    text = job.manifest.read_text()
    old = text.split('sha256 = "')[1].split('"')[0]
    job.manifest.write_text(
        text.replace(old, hashlib.sha256((job.dir / "work" / "app.py").read_bytes()).hexdigest())
    )
    digest = job.authorize()
    enc = job.dir / "enc" / "input.txt.enc"
    used = sha256_file(str(enc))
    other = job.dir / "other.enc"
    bound = str((job.dir / "work" / "input.txt").resolve())
    encrypt_file_plain(
        job.dir / "other.plain", b"the host's other input", other, job.model_key, bound
    )
    receipt = job.dir / "receipt.json"
    status: list[int] = []
    runner = threading.Thread(
        target=lambda: status.append(run_job(job.manifest, receipt=str(receipt)))
    )
    runner.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _any_program_running():
        time.sleep(0.1)
    assert _any_program_running(), "the program never started"
    os.replace(other, enc)  # the host swaps the input under the running program
    runner.join(120)
    assert status == [0]
    body = __import__("json").loads(receipt.read_text())["receipt"]
    [entry] = [i for i in body["inputs"] if i["path"].endswith("input.txt")]
    assert entry["sha256"] == {"": used} != {"": sha256_file(str(enc))}
    with pytest.raises(ReceiptError):  # the owner's check of today's files sees the swap
        verify_receipt(
            str(receipt),
            policy=Policy.from_toml(job.policy(digest)),
            trust=SimulatedPlatform.open(job.sim_dir, clock=system_clock).trust(),
        )
