"""Job manifests: validation, the workload digest, `shieldml job init|measure`."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shieldml.cli import main
from shieldml.errors import ManifestError, TrustedFileError
from shieldml.runner.manifest import HashCache, JobManifest, to_toml, toml_string


def scaffold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    (tmp_path / "infer.py").write_text("print('hi')\n")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "util.py").write_text("X = 1\n")
    args = ["job", "init", str(tmp_path / "infer.py"), "-o", str(tmp_path / "job.toml")]
    assert main([*args, "--tee", "auto"]) == 0
    capsys.readouterr()
    return tmp_path / "job.toml"


def test_init_then_measure(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    m = scaffold(tmp_path, capsys)
    assert main(["job", "measure", str(m), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["workload_digest"].startswith("sha256:") and doc["trusted_files"][0][
        "path"
    ].endswith("infer.py")
    assert main(["job", "init", str(tmp_path / "infer.py"), "-o", str(m)]) == 1  # never overwrites


def test_digest_changes_with_script_manifest_and_globbed_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    m = scaffold(tmp_path, capsys)
    m.write_text(m.read_text() + '\n[[trusted]]\nglob = "lib/**/*.py"\n')
    d1 = JobManifest.load(m).workload_digest()
    (tmp_path / "lib" / "util.py").write_text("X = 2\n")
    d2 = JobManifest.load(m).workload_digest()
    m.write_text(m.read_text().replace('allow = ["LANG"]', 'allow = ["LANG", "LC_ALL"]'))
    d3 = JobManifest.load(m).workload_digest()
    assert len({d1, d2, d3}) == 3
    (tmp_path / "infer.py").write_text("print('changed')\n")
    with pytest.raises(TrustedFileError, match=r"infer\.py"):
        JobManifest.load(m).workload_digest()


def test_hash_cache_is_reused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    m = scaffold(tmp_path, capsys)
    cache = HashCache(tmp_path / "hashes.json")
    d = JobManifest.load(m).workload_digest(cache)
    cache.save()
    again = HashCache(tmp_path / "hashes.json")
    assert again.entries and JobManifest.load(m).workload_digest(again) == d


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[command]\nargv = []", "non-empty"),
        ("colour = 1\n[command]\nargv = ['/x']", "unknown field"),
        ("tee = 'nope'\n[command]\nargv = ['/x']", "tee must be"),
        ("[command]\nargv = ['/x']\n[[trusted]]\npath = 'a'", "sha256"),
        ("[command]\nargv = ['/x']\n[[broker]]\nname = 'b'\nurl = 'https://x'", "fingerprint"),
        (
            "[command]\nargv = ['/x']\n[[input]]\npath = 'a'\nciphertext = 'b'\nkey = 'k'\nbroker = 'nobody'",
            "unknown broker",
        ),
        ("[command\n", "not valid TOML"),
        # found by atheris: a string where a table or an array is expected raised AttributeError
        ("[command]\nargv = ['/x']\n[env]\nset = 'abab'", "env.set map"),
        ("[command]\nargv = ['/x']\n[env]\nallow = 'PATH'", "env.allow must list"),
        ("[command]\nargv = ['/x']\n[env]\nset = {A = 1}", "env.set map"),
        ("trusted = 'lib'\n[command]\nargv = ['/x']", "array of tables"),
        ("input = {path = 'a'}\n[command]\nargv = ['/x']", "array of tables"),
        ("broker = 3\n[command]\nargv = ['/x']", "array of tables"),
    ],
)
def test_invalid_manifests(tmp_path: Path, text: str, message: str):
    (tmp_path / "job.toml").write_text(text)
    with pytest.raises(ManifestError, match=message):
        JobManifest.load(tmp_path / "job.toml")


def test_oversized_manifest_is_refused_without_reading_it_all(tmp_path: Path):
    from shieldml.errors import ManifestError
    from shieldml.runner.manifest import MAX_MANIFEST, JobManifest

    big = tmp_path / "job.toml"
    with big.open("wb") as f:
        f.truncate(8 * MAX_MANIFEST)  # sparse: a huge file costs nothing on disk
    with pytest.raises(ManifestError, match="too large"):
        JobManifest.load(big)


# -- the host chooses env values, argv[0]'s lookup and the layout (issue 12, points 4 and 5) -------


def _manifest(tmp_path: Path, body: str, argv: str = '["/usr/bin/python3", "app.py"]') -> Path:
    (tmp_path / "app.py").write_text("print('hi')\n")
    (tmp_path / "job.toml").write_text(f"[command]\nargv = {argv}\n{body}")
    return tmp_path / "job.toml"


def test_path_in_env_allow_is_refused(tmp_path: Path):
    # the host sets PATH=evil:$PATH; a passed-through PATH picks which programs run
    m = _manifest(tmp_path, '[env]\nallow = ["LANG", "PATH"]\n')
    with pytest.raises(ManifestError, match=r"env\.allow.*PATH.*env\.set"):
        JobManifest.load(m)


def test_home_in_env_allow_is_refused(tmp_path: Path):
    # HOME holds ~/.local/lib/pythonX.Y/site-packages: a .pth file there runs at start-up
    m = _manifest(tmp_path, '[env]\nallow = ["HOME"]\n')
    with pytest.raises(ManifestError, match=r"HOME.*env\.set"):
        JobManifest.load(m)


@pytest.mark.parametrize(
    "name",
    [
        "PATH", "HOME", "PWD", "SHELL", "BASH_ENV", "ENV", "IFS", "TMPDIR", "XDG_CONFIG_HOME",
        "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONPYCACHEPREFIX",
        "PYTHONSAFEPATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "GCONV_PATH", "LOCPATH",
        "MALLOC_CHECK_", "GLIBC_TUNABLES", "HOSTALIASES", "RESOLV_HOST_CONF", "PERL5LIB",
        "RUBYOPT", "NODE_OPTIONS", "JAVA_TOOL_OPTIONS", "OPENSSL_CONF", "OMP_TOOL_LIBRARIES",
        "TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH",
        "CUDA_HOME", "CXX", "NCCL_NET_PLUGIN", "HF_HOME", "path",
    ],
)  # fmt: skip
def test_code_locating_variable_in_env_allow_is_refused(tmp_path: Path, name: str):
    m = _manifest(tmp_path, f'[env]\nallow = ["{name}"]\n')
    with pytest.raises(ManifestError, match=rf"env\.allow.*{name}.*env\.set"):
        JobManifest.load(m)


def test_tuning_variables_may_still_pass_through(tmp_path: Path):
    names = ["LANG", "LC_ALL", "TZ", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES"]
    m = _manifest(tmp_path, f"[env]\nallow = {json.dumps(names)}\n")
    assert JobManifest.load(m).env_allow == tuple(names)


def test_env_set_may_fix_code_locating_variables_because_values_are_measured(tmp_path: Path):
    m = _manifest(tmp_path, '[env]\nset = { PATH = "/usr/bin:/bin", HOME = "/nonexistent" }\n')
    d1 = JobManifest.load(m).workload_digest()
    m.write_text(m.read_text().replace("/nonexistent", "/tmp/evil"))
    assert JobManifest.load(m).workload_digest() != d1


@pytest.mark.parametrize("name", ["", "A=B", "A\\u0000B"])
def test_malformed_env_names_are_refused(tmp_path: Path, name: str):
    for body in (f'[env]\nallow = ["{name}"]\n', f'[env]\nset = {{ "{name}" = "1" }}\n'):
        m = _manifest(tmp_path, body)
        with pytest.raises(ManifestError, match="environment variable name"):
            JobManifest.load(m)


def test_nul_in_env_value_or_argv_is_refused(tmp_path: Path):
    m = _manifest(tmp_path, '[env]\nset = { A = "x\\u0000y" }\n')
    with pytest.raises(ManifestError, match="NUL"):
        JobManifest.load(m)
    m = _manifest(tmp_path, "", argv='["/usr/bin/python3", "a\\u0000b"]')
    with pytest.raises(ManifestError, match="NUL"):
        JobManifest.load(m)


@pytest.mark.parametrize("argv0", ["python3", "bin/python3", "./python3"])
def test_bare_interpreter_name_in_argv_is_refused(tmp_path: Path, argv0: str):
    # a bare name is looked up on the PATH the program runs with; a relative one in its cwd
    m = _manifest(tmp_path, "", argv=f'["{argv0}", "app.py"]')
    with pytest.raises(ManifestError, match=r"argv\[0\].*absolute") as e:
        JobManifest.load(m)
    assert "/" in (e.value.hint or "")


def test_scaffold_passes_no_code_locating_variable_and_names_an_absolute_interpreter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    m = JobManifest.load(scaffold(tmp_path, capsys))
    assert Path(m.argv[0]).is_absolute() and Path(m.argv[0]).exists()
    assert not {"PATH", "HOME"} & set(m.env_allow)


def test_scaffold_for_a_script_in_a_subdirectory_runs_it_from_its_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "infer.py").write_text("print('hi')\n")
    (tmp_path / "app" / "util.py").write_text("X = 1\n")
    out = tmp_path / "job.toml"
    app = tmp_path / "app"
    args = ["job", "init", str(app / "infer.py"), str(app / "util.py"), "-o", str(out)]
    assert main([*args, "--python", "/usr/bin/env", "--tee", "auto"]) == 0
    m = JobManifest.load(out)
    assert m.argv == ("/usr/bin/env", "infer.py")
    assert Path(m.cwd) == (tmp_path / "app").resolve()
    assert (Path(m.cwd) / m.argv[1]).exists()
    assert [Path(p).name for p, _h in m.trusted_files()] == ["infer.py", "util.py"]


def _two_owners(tmp_path: Path, items: str) -> Path:
    return _manifest(
        tmp_path,
        '[[broker]]\nname = "model"\nurl = "http://127.0.0.1:1"\n'
        '[[broker]]\nname = "data"\nurl = "http://127.0.0.1:2"\n' + items,
    )


def test_output_nested_in_another_owners_input_is_refused(tmp_path: Path):
    # the model owner's output directory sat inside the data owner's decrypted input directory
    m = _two_owners(
        tmp_path,
        '[[input]]\npath = "images/"\nciphertext = "enc/images"\nkey = "data"\nbroker = "data"\n'
        '[[output]]\npath = "images/preds/"\nciphertext = "out/preds"\nkey = "m"\nbroker = "model"\n',
    )
    with pytest.raises(ManifestError, match=r"input 1 .*images/.* output 1 .*images/preds/"):
        JobManifest.load(m)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("images/", "images/cat.png"),  # a file inside a directory
        ("images/", "images/"),  # the same directory twice
        ("images/", "./images/sub/../"),  # the same directory, spelled otherwise
        ("images/", "images"),  # a file where a directory is mounted
        ("work/", "work/data/x.bin"),
    ],
)
def test_protected_path_inside_another_is_refused(tmp_path: Path, first: str, second: str):
    m = _two_owners(
        tmp_path,
        f'[[input]]\npath = "{first}"\nciphertext = "enc/a"\nkey = "a"\nbroker = "data"\n'
        f'[[input]]\npath = "{second}"\nciphertext = "enc/b"\nkey = "b"\nbroker = "model"\n',
    )
    with pytest.raises(ManifestError, match=r"input 1 .* input 2 "):
        JobManifest.load(m)


def test_protected_paths_sharing_a_string_prefix_are_fine(tmp_path: Path):
    m = _two_owners(
        tmp_path,
        '[[input]]\npath = "images/"\nciphertext = "enc/a"\nkey = "a"\nbroker = "data"\n'
        '[[output]]\npath = "images2/"\nciphertext = "out/b"\nkey = "b"\nbroker = "model"\n'
        '[[output]]\npath = "images.txt"\nciphertext = "out/c"\nkey = "c"\nbroker = "model"\n',
    )
    assert len(JobManifest.load(m).outputs) == 2


def _sha(p: Path) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("protected", ["app.py", "./", "lib/", "../"])
def test_protected_path_over_a_trusted_file_is_refused(tmp_path: Path, protected: str):
    # a mount at (or above) a measured file hides it: what runs is not what was measured
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "util.py").write_text("X = 1\n")
    (tmp_path / "app.py").write_text("print('hi')\n")
    m = _two_owners(
        tmp_path,
        f'[[trusted]]\npath = "app.py"\nsha256 = "{_sha(tmp_path / "app.py")}"\n'
        '[[trusted]]\nglob = "lib/*.py"\n'
        f'[[input]]\npath = "{protected}"\nciphertext = "enc/a"\nkey = "a"\nbroker = "data"\n',
    )
    with pytest.raises((ManifestError, TrustedFileError), match=r"input 1 .*trusted"):
        JobManifest.load(m).workload_digest()


def test_protected_file_beside_a_trusted_file_is_fine(tmp_path: Path):
    m = _two_owners(
        tmp_path,
        '[[trusted]]\nglob = "*.py"\n'
        '[[input]]\npath = "model.bin"\nciphertext = "enc/a"\nkey = "a"\nbroker = "data"\n'
        '[[output]]\npath = "out/"\nciphertext = "enc/o"\nkey = "o"\nbroker = "model"\n',
    )
    assert JobManifest.load(m).workload_digest().startswith("sha256:")


# -- the TOML emitter behind `shieldml job init` -----------------------------------------------

NASTY = ['say "hi"', "a\\b", "line\nbreak\r\n", "tab\tand\bbell\x07\x00", "del\x7f", "ünï ☃ 𝄞",
         "'single'", '"""', "# not a comment", "[not] = a table", "\u2028\u0085"]  # fmt: skip


def test_toml_strings_round_trip():
    for s in NASTY:
        assert tomllib.loads(f"k = {toml_string(s)}\n") == {"k": s}, s


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_round_trips(s: str):
    assert tomllib.loads(f"k = {toml_string(s)}\n") == {"k": s}


def test_not_unicode_is_refused():
    with pytest.raises(ManifestError, match="not valid Unicode"):
        toml_string("name\udcff.py")  # a non-UTF-8 file name, as os.fsdecode gives it


def test_documents_round_trip():
    doc = {
        "version": 1,
        "tee": NASTY[0],
        "flag": False,
        "empty": [],
        "command": {"argv": NASTY, "cwd": ".", "insecure_allow_extra_args": True},
        "env": {"allow": ["LANG"], "set": {"A B": 'x"y', "C": "ü"}, "none": {}},
        "trusted": [{"path": s, "sha256": "0" * 64} for s in NASTY],
        "key with spaces": {"ü": "x", "": "empty key"},
        "after": {"x": [1, 2, {"inline": [True]}]},
    }
    text = to_toml(doc, {"tee": "a comment", "env": "two\nlines", "command.cwd": "the cwd"})
    assert tomllib.loads(text) == doc
    assert 'cwd = "."  # the cwd' in text and "[env]\n# two\n# lines\n" in text
    assert text.index("flag = false") < text.index("[command]")  # plain values before tables
    with pytest.raises(TypeError):
        to_toml({"x": 1.5})


def test_init_with_names_toml_must_escape(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    app = tmp_path / 'my "app"\n☃'
    app.mkdir()
    script = app / 'in"fer\\.py'
    script.write_text("print('hi')\n")
    extra = app / "tab\there.py"
    extra.write_text("X = 1\n")
    out = tmp_path / "job.toml"
    for tee in ("simulated", "tdx"):
        args = ["job", "init", str(script), str(extra), "-o", str(out), "--tee", tee]
        assert main([*args, "--python", "/usr/bin/env"]) == 0
        m = JobManifest.load(out)
        assert m.tee == tee and m.argv == ("/usr/bin/env", script.name)
        assert Path(m.cwd) == app.resolve()
        assert [Path(p).name for p, _h in m.trusted_files()] == [script.name, extra.name]
        assert m.simulated == (
            {"platform": "sim-platform", "kind": "sgx"} if tee == "simulated" else {}
        )
        text = out.read_text(encoding="utf-8")
        assert "# [[broker]]" in text and "# [[input]]" in text and "# [[output]]" in text
        assert tomllib.loads(text)["env"] == {"allow": ["LANG"]}
        out.unlink()
    capsys.readouterr()


def test_misspelled_job_field_gets_did_you_mean(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    m = scaffold(tmp_path, capsys)
    m.write_text(m.read_text() + '\n[[trusted]]\nglb = "lib/**/*.py"\n')
    with pytest.raises(ManifestError) as e:
        JobManifest.load(m)
    assert "did you mean glb -> glob?" in (e.value.hint or "")
