"""`shieldml job init SCRIPT --input … --output …`: a manifest that runs as written (issue 19)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from shieldml.cli import main
from shieldml.files import Format, encrypt_file, generate_key
from shieldml.runner.evidence import machine_tee
from shieldml.runner.manifest import JobManifest
from tests.conftest import pf_crypt_tool

FP = "ab" * 32
BROKER = ["--broker-url", "https://127.0.0.1:8443", "--broker-fingerprint", FP]


def pf(*args: str, cwd: Path) -> None:
    subprocess.run([str(pf_crypt_tool("v1.9")), *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tutorial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Gramine's tutorial layout under tmp_path (the current directory): app/infer.py, and
    pf-crypt's files in app/ under the names infer.py opens (stored paths "model.pt", …)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "app").mkdir()
    (tmp_path / "plain").mkdir()
    (tmp_path / "app" / "infer.py").write_text("print(open('model.pt', 'rb').read()[:4])\n")
    (tmp_path / "plain" / "model.pt").write_bytes(b"MODEL" * 100)
    (tmp_path / "plain" / "classes.txt").write_text("cat\n")
    pf("gen-key", "-w", "wrap_key", cwd=tmp_path)
    for name in ("model.pt", "classes.txt"):
        pf(
            "encrypt",
            "-w",
            "../wrap_key",
            "-i",
            f"../plain/{name}",
            "-o",
            name,
            cwd=tmp_path / "app",
        )
    return tmp_path


def test_init_with_inputs_and_outputs_writes_a_manifest_that_runs_as_written(
    tutorial: Path, capsys: pytest.CaptureFixture[str]
):
    args = ["job", "init", "app/infer.py", "--input", "app/model.pt", "--input", "app/classes.txt",
            "--output", "app/result.txt", "--key-file", "wrap_key", "--input-key", "wrap",
            "--output-key", "wrap", "--simulated-platform", "sim", *BROKER, "--json"]  # fmt: skip
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tee"] == "simulated"  # --simulated-platform implies it
    m = JobManifest.load(tutorial / "job.toml")
    app = (tutorial / "app").resolve()
    # the interpreter by its absolute path; the script run from its own directory
    assert Path(m.argv[0]).is_absolute() and m.argv[1:] == ("infer.py",)
    assert Path(m.cwd) == app and (Path(m.cwd) / m.argv[1]).is_file()
    assert [(i.path, i.ciphertext, i.format, i.bind) for i in m.inputs] == [
        (str(app / "model.pt"), str(app / "model.pt"), "gramine-pf", "model.pt"),
        (str(app / "classes.txt"), str(app / "classes.txt"), "gramine-pf", "classes.txt"),
    ]
    (o,) = m.outputs
    assert (o.path, o.ciphertext, o.format, o.bind) == (
        str(app / "result.txt"), str(app / "result.txt"), "gramine-pf", None,
    )  # fmt: skip
    assert doc["outputs"][0]["bind"] == str(app / "result.txt")
    assert [(b.name, b.fingerprint) for b in m.brokers] == [("owner", FP)]
    assert m.workload_digest().startswith("sha256:")
    text = (tutorial / "job.toml").read_text()
    assert "# [[input]]" not in text  # no commented examples once the tables are there


def test_gramine_pf_input_without_its_key_is_refused_with_what_to_pass(
    tutorial: Path, capsys: pytest.CaptureFixture[str]
):
    args = ["job", "init", "app/infer.py", "--input", "app/model.pt", "--tee", "simulated"]
    assert main([*args, *BROKER]) == 1
    assert "give its key (--key-file)" in capsys.readouterr().err
    other = tutorial / "other_key"
    other.write_bytes(generate_key(Format.GRAMINE_PF))
    assert main([*args, *BROKER, "--key-file", str(other)]) == 1
    assert "none of the --key-file keys opens it" in capsys.readouterr().err
    assert not (tutorial / "job.toml").exists()


def test_plaintext_input_is_refused_with_the_encrypt_command(
    tutorial: Path, capsys: pytest.CaptureFixture[str]
):
    args = ["job", "init", "app/infer.py", "--input", "model.pt=plain/model.pt", "--tee", "auto"]
    assert main([*args, *BROKER]) == 1
    err = capsys.readouterr().err
    assert "not a protected file" in err
    assert f"--bind {(tutorial / 'app' / 'model.pt').resolve()}" in err


def test_stream_input_bound_to_its_ciphertext_path_gets_that_bind(
    tutorial: Path, capsys: pytest.CaptureFixture[str]
):
    """`shieldml encrypt plain/x enc/x` binds to "enc/x" (OUT as given): job init finds it."""
    key = generate_key()
    (tutorial / "k").write_bytes(key)
    encrypt_file("plain/model.pt", "enc/model.pt", key)  # bound to "enc/model.pt"
    encrypt_file("plain/classes.txt", "enc/classes.txt", key, bind=str(tutorial.resolve() / "app" / "classes.txt"))  # fmt: skip
    args = ["job", "init", "app/infer.py", "--input", "model.pt=enc/model.pt",
            "--input", "classes.txt=enc/classes.txt", "--key-file", "k", "--tee", "auto",
            *BROKER]  # fmt: skip
    assert main(args) == 0
    m = JobManifest.load(tutorial / "job.toml")
    assert [(Path(i.path).name, i.format, i.bind) for i in m.inputs] == [
        ("model.pt", "stream", "enc/model.pt"),
        ("classes.txt", "stream", None),  # bound to the in-TEE path already
    ]
    capsys.readouterr()
    # without the key, job init cannot tell: it says so, and the runner checks at run time
    assert main([*[a for a in args if a not in ("--key-file", "k")], "-o", "j3.toml"]) == 0
    assert "(not checked: no --key-file of its format)" in capsys.readouterr().out
    encrypt_file("plain/model.pt", "enc/elsewhere", key, bind="/somewhere/else")
    args[4] = "model.pt=enc/elsewhere"
    assert main([*args, "-o", "j2.toml"]) == 1
    assert "shieldml rebind enc/elsewhere" in capsys.readouterr().err


@pytest.mark.skipif(machine_tee() is not None, reason="this machine has a TEE: auto is the default")
def test_no_tee_given_on_a_machine_without_one_says_to_pass_tee_simulated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    (tmp_path / "infer.py").write_text("print(1)\n")
    assert main(["job", "init", str(tmp_path / "infer.py"), "-o", str(tmp_path / "j.toml")]) == 2
    assert "pass --tee simulated" in capsys.readouterr().err
    assert not (tmp_path / "j.toml").exists()


def test_inputs_without_a_broker_are_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("SHIELDML_BROKER_URL", raising=False)
    (tmp_path / "infer.py").write_text("print(1)\n")
    args = ["job", "init", str(tmp_path / "infer.py"), "-o", str(tmp_path / "j.toml")]
    assert main([*args, "--tee", "auto", "--output", "r.txt"]) == 2
    assert "--broker-url" in capsys.readouterr().err


def test_gpus_writes_the_gpu_table_and_a_simulated_tdx_with_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.chdir(tmp_path)
    Path("infer.py").write_text("print(1)\n")
    assert main(["job", "init", "infer.py", "--tee", "simulated", "--gpus", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpus"] == 3
    m = JobManifest.load("job.toml")
    assert m.gpu is not None and m.gpu.evidence == "nvml" and m.gpu.collateral is None
    assert (m.simulated["kind"], m.simulated["gpus"]) == ("tdx", "3")
    assert main(["job", "init", "infer.py", "--tee", "snp", "--gpus", "2", "-o", "snp.toml"]) == 0
    real = JobManifest.load("snp.toml")
    assert real.gpu is not None and real.simulated == {}
    assert "--set gpu.count=2" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "match"), [
    (["--tee", "sgx", "--gpus", "1"], "an SGX enclave cannot own a GPU"),
    (["--tee", "tdx", "--gpus", "0"], "0 is not in the range 1<=x<=16"),
    (["--tee", "tdx", "--gpus", "17"], "17 is not in the range"),
])  # fmt: skip
def test_gpus_refused_where_no_gpu_can_be(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    match: str,
):
    monkeypatch.chdir(tmp_path)
    Path("infer.py").write_text("print(1)\n")
    assert main(["job", "init", "infer.py", *args]) == 2
    assert match in capsys.readouterr().err and not Path("job.toml").exists()
