"""The `shieldml` command: the exact forms the issue relies on, exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shieldml.cli import EXIT_CODES, EXIT_ERROR, EXIT_INTEGRITY, EXIT_USAGE, main
from shieldml.files import Format, open_protected
from tests.conftest import vector_plaintext


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_key_new_mode_and_no_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    k = tmp_path / "k"
    rc, _, _ = run(capsys, "key", "new", str(k))
    assert rc == 0 and len(k.read_bytes()) == 32
    assert stat.S_IMODE(k.stat().st_mode) == 0o600
    before = k.read_bytes()
    rc, _, err = run(capsys, "key", "new", str(k))
    assert rc == EXIT_ERROR and "already exists" in err and k.read_bytes() == before
    rc, out, _ = run(capsys, "key", "new", str(tmp_path / "g"), "--format", "gramine-pf", "--json")
    assert rc == 0 and json.loads(out)["size"] == 16
    assert len((tmp_path / "g").read_bytes()) == 16


def test_encrypt_inspect_decrypt_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    k, p, c, d = tmp_path / "k", tmp_path / "p", tmp_path / "c", tmp_path / "d"
    run(capsys, "key", "new", str(k))
    p.write_bytes(os.urandom(100000))
    rc, out, _ = run(
        capsys, "encrypt", str(p), str(c), "--key", str(k), "--bind", "/tee/p", "--json"
    )
    assert rc == 0 and json.loads(out)["files"][0]["bound_path"] == "/tee/p"
    rc, out, _ = run(capsys, "inspect", str(c), "--json")
    info = json.loads(out)
    assert rc == 0
    assert info["format"] == "stream" and info["plaintext_size"] == 100000
    assert info["header_size"] == 29 and len(info["key_id"]) == 32 and info["version"] == 1
    rc, _, err = run(capsys, "decrypt", str(c), str(d), "--key", str(k))
    assert rc == EXIT_INTEGRITY and "failed authentication" in err and not d.exists()
    rc, _, _ = run(capsys, "decrypt", str(c), str(d), "--key", str(k), "--bind", "/tee/p")
    assert rc == 0 and d.read_bytes() == p.read_bytes()


def test_gramine_bind_defaults_to_out_like_pf_crypt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    run(capsys, "key", "new", "wrap", "--format", "gramine-pf")
    Path("plain").mkdir()
    Path("plain/input.txt").write_bytes(b"x" * 5000)
    rc, _, _ = run(
        capsys, "encrypt", "plain/input.txt", "enc_files/./input.txt", "--key", "wrap",
        "--format", "gramine-pf", "--gramine-version", "2",
    )  # fmt: skip
    assert rc == 0
    key = Path("wrap").read_bytes()
    with open_protected("enc_files/input.txt", key, bind="enc_files/input.txt") as f:
        assert f.stored_path == "enc_files/input.txt" and f.header.major_version == 2
    rc, out, _ = run(capsys, "inspect", "enc_files/input.txt", "--key", "wrap", "--json")
    assert json.loads(out)["plaintext_size"] == 5000
    assert json.loads(out)["bound_path"] == "enc_files/input.txt"


def test_gramine_vector_through_cli(
    vectors: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    pf = vectors / "gramine-pf"
    out = tmp_path / "o"
    rc, _, _ = run(
        capsys, "decrypt", str(pf / "v2/size_7169.pf"), str(out),
        "--key", str(pf / "wrap-key"), "--bind", "v2/size_7169.pf",
    )  # fmt: skip
    assert rc == 0 and out.read_bytes() == vector_plaintext(7169)


def test_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    run(capsys, "key", "new", str(tmp_path / "k"))
    src = tmp_path / "in"
    (src / "s").mkdir(parents=True)
    (src / "a").write_bytes(b"A" * 10)
    (src / "s" / "b").write_bytes(b"B" * 10)
    rc, out, _ = run(capsys, "encrypt", str(src), str(tmp_path / "enc"),
                     "--key", str(tmp_path / "k"), "--bind", "/data", "--json")  # fmt: skip
    assert rc == 0
    assert sorted(f["bound_path"] for f in json.loads(out)["files"]) == ["/data/a", "/data/s/b"]
    rc, _, _ = run(capsys, "decrypt", str(tmp_path / "enc"), str(tmp_path / "dec"),
                   "--key", str(tmp_path / "k"), "--bind", "/data", "--workers", "2")  # fmt: skip
    assert rc == 0 and (tmp_path / "dec" / "s" / "b").read_bytes() == b"B" * 10


def test_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "plain").write_bytes(b"hi")
    (tmp_path / "short").write_bytes(b"123")
    run(capsys, "key", "new", str(tmp_path / "g"), "--format", "gramine-pf")
    rc, _, err = run(capsys, "inspect", str(tmp_path / "plain"))
    assert rc == EXIT_ERROR and "not a protected file" in err
    rc, _, err = run(capsys, "encrypt", str(tmp_path / "plain"), str(tmp_path / "c"),
                     "--key", str(tmp_path / "short"))  # fmt: skip
    assert rc == EXIT_ERROR and "32 bytes" in err
    rc, _, err = run(capsys, "encrypt", str(tmp_path / "plain"), str(tmp_path / "c"),
                     "--key", str(tmp_path / "g"))  # fmt: skip
    assert rc == EXIT_ERROR and "--format gramine-pf" in err
    rc, _, _ = run(capsys, "encrypt", str(tmp_path / "plain"))
    assert rc == EXIT_USAGE
    assert not (tmp_path / "c").exists()


def test_wrong_key_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    run(capsys, "key", "new", str(tmp_path / "k1"))
    run(capsys, "key", "new", str(tmp_path / "k2"))
    (tmp_path / "p").write_bytes(b"secret")
    run(capsys, "encrypt", str(tmp_path / "p"), str(tmp_path / "c"), "--key", str(tmp_path / "k1"))
    rc, _, err = run(capsys, "decrypt", str(tmp_path / "c"), str(tmp_path / "d"),
                     "--key", str(tmp_path / "k2"))  # fmt: skip
    assert rc == EXIT_INTEGRITY and "wrong key" in err


def test_console_script_prints_no_traceback(tmp_path: Path):
    (tmp_path / "plain").write_bytes(b"hi")
    proc = subprocess.run(
        [sys.executable, "-m", "shieldml.cli", "inspect", str(tmp_path / "plain")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == EXIT_ERROR
    assert "Traceback" not in proc.stderr and "not a protected file" in proc.stderr


def test_files_tour_runs(capsys: pytest.CaptureFixture[str]):
    rc, out, _ = run(capsys, "demo", "--files-only")
    assert rc == 0
    assert "NOT detected" not in out and "Every attack was detected" in out
    assert out.count("✓") == 5


@pytest.mark.skipif(
    os.geteuid() != 0, reason="the demo's decrypted view needs root (or user namespaces) here"
)
def test_demo_tells_the_whole_story(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    monkeypatch.setenv("COLUMNS", "300")  # the demo wraps to the terminal: one line per line here
    rc, out, _ = run(capsys, "demo", "--repeats", "1")  # medians of more: minutes, not for CI
    assert rc == 0
    assert out.count("✓ refused") == 3 and "NOT refused" not in out
    assert "verdict fails workload_digest" in out and "verdict fails debug\n" in out.replace(
        " \n", "\n"
    )
    accuracy = float(out.split("accuracy ")[1].split("%")[0])
    assert accuracy >= 95.0
    assert "none found" in out and out.count("chain intact") == 2


def test_format_enum_values_are_the_cli_choices():
    assert [f.value for f in Format] == ["stream", "gramine-pf"]


def test_exit_codes_are_documented():
    import shieldml.cli

    doc = " ".join((shieldml.cli.__doc__ or "").split())
    reference = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert EXIT_CODES[EXIT_ERROR] and EXIT_CODES[EXIT_USAGE] and EXIT_CODES[EXIT_INTEGRITY]
    for code, meaning in EXIT_CODES.items():
        assert f"- {code}: {meaning}" in doc, code
        assert f"| {code} | {meaning} |" in reference, code


@pytest.mark.parametrize(
    ("missing", "argv"),
    [
        ("fastapi", ["broker", "serve"]),
        ("uvicorn", ["broker", "serve"]),
        ("sqlalchemy", ["broker", "rotate-kek"]),
    ],
)
def test_broker_without_the_extra_is_one_error_line(tmp_path: Path, missing: str, argv: list[str]):
    """An install without the [broker] extra: `error: ...` naming the extra, exit 1, no traceback."""
    code = (
        f"import sys; sys.modules[{missing!r}] = None; from shieldml.cli import main; "
        f"sys.exit(main({[*argv, '--state', str(tmp_path / 'state')]!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == EXIT_ERROR, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: the key broker needs the [broker] extra")
    assert f"{missing} is missing" in lines[0] and "pip install 'shieldml[broker]'" in lines[0]
    assert proc.stdout == "" and not (tmp_path / "state").exists()


def test_help_shows_the_environment_variables_it_reads():
    from click.testing import CliRunner

    from shieldml.cli import cli

    text = CliRunner().invoke(cli, ["broker", "key", "list", "--help"], terminal_width=200).output
    assert "env var: SHIELDML_BROKER_URL" in text
    assert "env var: SHIELDML_BROKER_FINGERPRINT" in text
    assert "SHIELDML_BROKER_TOKEN" in text


def test_demo_without_torch_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    assert main(["demo"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "the demo needs torch" in err and "shieldml[broker,examples]" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("native", "shielded", "want"),
    [
        (54.92, 41.47, "\N{MINUS SIGN}13.45 s (shielded faster: load changed between the runs)"),
        (1.79, 2.28, "+0.49 s (+27%)"),
        (10.0, 10.5, "+0.50 s (within noise)"),
        (1.0, 0.9, "\N{MINUS SIGN}0.10 s (within noise)"),
    ],
)
def test_demo_never_prints_plus_minus_overhead(native: float, shielded: float, want: str):
    from shieldml.demo import overhead_text

    assert overhead_text(native, shielded) == want


def test_demo_noise_is_the_spread_of_repeated_runs():
    from shieldml.demo import noise, overhead_text

    assert noise([3.0], [3.5]) is None  # one run each: the share-of-native rule applies
    spread = noise([3.0, 3.4, 3.1], [3.6, 3.5, 3.9])
    assert spread == pytest.approx(0.4)
    assert overhead_text(3.1, 3.6, spread) == "+0.50 s (+16%)"  # more than runs of one job vary
    assert overhead_text(3.1, 3.4, spread) == "+0.30 s (within noise)"
    assert overhead_text(3.4, 3.1, spread) == "\N{MINUS SIGN}0.30 s (within noise)"


@pytest.mark.parametrize("width", [50, 72])
def test_demo_lines_fit_the_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, width: int
):
    """rich wraps every line of `shieldml demo` to the terminal's width (no line the terminal
    would have to break mid-word; no hard-coded breaks needed)."""
    monkeypatch.setenv("COLUMNS", str(width))
    rc, out, _ = run(capsys, "demo", "--files-only", "--workdir", str(tmp_path))
    lines = out.splitlines()
    assert rc == 0 and len(lines) > 20
    assert max(len(line) for line in lines) <= width


def _json_error(err: str) -> dict[str, object]:
    """The error object of --json: one JSON object, the last line of stderr."""
    doc = json.loads(err.strip().splitlines()[-1])
    assert isinstance(doc, dict) and doc["ok"] is False
    assert set(doc) == {"ok", "error", "kind", "type", "hint", "exit_code", "details"}
    return doc


def test_json_errors_are_one_object_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    plain = tmp_path / "plain.txt"
    plain.write_text("not a protected file")
    rc, out, err = run(capsys, "inspect", str(plain), "--json")
    doc = _json_error(err)
    assert rc == EXIT_ERROR == doc["exit_code"] and out == ""
    assert doc["kind"] == "error" and doc["type"] == "NotProtectedError"
    assert str(plain) in str(doc["error"])
    # an integrity failure: its own kind and code, and where
    k, c, d = tmp_path / "k", tmp_path / "c", tmp_path / "d"
    run(capsys, "key", "new", str(k))
    run(capsys, "encrypt", str(plain), str(c), "--key", str(k), "--bind", "/tee/p")
    rc, out, err = run(capsys, "decrypt", str(c), str(d), "--key", str(k), "--json")
    doc = _json_error(err)
    assert rc == EXIT_INTEGRITY == doc["exit_code"] and doc["kind"] == "integrity"
    details = doc["details"]
    assert isinstance(details, dict) and details["path"] == str(c) and out == ""
    # usage errors: found while processing the options, and by the parser itself
    rc, _, err = run(capsys, "key", "new", "--json")
    doc = _json_error(err)
    assert (
        rc == EXIT_USAGE == doc["exit_code"]
        and doc["kind"] == "usage"
        and "OUT" in str(doc["error"])
    )
    rc, _, err = run(capsys, "inspect", "--json", "--bogus", str(plain))
    doc = _json_error(err)
    assert rc == EXIT_USAGE and doc["kind"] == "usage" and "--bogus" in str(doc["error"])
    # without --json: the usual line
    rc, _, err = run(capsys, "inspect", str(plain))
    assert rc == EXIT_ERROR and err.startswith("error: ") and "{" not in err


def test_key_recipient_and_job_init_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rec = tmp_path / "rec"
    rc, out, _ = run(capsys, "key", "recipient", str(rec), "--json")
    assert rc == 0 and json.loads(out) == {"private": str(rec), "public": str(rec) + ".pub"}
    assert Path(str(rec) + ".pub").exists()
    app = tmp_path / "app.py"
    app.write_text("print(1)\n")
    job = tmp_path / "job.toml"
    rc, out, _ = run(
        capsys, "job", "init", str(app), "-o", str(job), "--python", sys.executable, "--json",
        "--tee", "auto",
    )  # fmt: skip
    doc = json.loads(out)
    assert rc == 0 and doc["output"] == str(job) and job.exists()
    assert doc["interpreter"] == str(Path(sys.executable).absolute())
    rc, out, err = run(capsys, "job", "init", str(app), "-o", str(job), "--json")
    assert rc == EXIT_ERROR and out == "" and _json_error(err)["type"] == "OutputExistsError"


def test_decrypt_loads_only_the_files_commands():
    """Start-up of `shieldml decrypt` does not import the other command groups (the broker's
    HTTP client, attestation commands, the runner)."""
    import subprocess
    import sys

    code = (
        "import sys; from shieldml.cli import main; main(['decrypt', '--help']); "
        "loaded = [m for m in ('shieldml.cli.broker', 'shieldml.cli.attest', 'shieldml.cli.run',"
        " 'httpx') if m in sys.modules]; print(loaded)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
