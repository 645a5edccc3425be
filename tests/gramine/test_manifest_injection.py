"""Gramine manifests cannot be injected (issue 13, point 7).

``gramine_manifest`` formatted ``loader.env.{name} = …`` lines and JSON-quoted strings into a
template that ``gramine-manifest`` then renders with Jinja2 and parses as TOML: an environment
variable name with a newline, or a string holding ``{{ … }}``, put
``loader.insecure__use_host_env = true`` and ``sgx.allowed_files = ["file:/"]`` into the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shieldml.errors import ManifestError
from shieldml.gramine._toml import Inline, Template, dumps
from shieldml.gramine.manifest import gramine_manifest
from shieldml.runner.manifest import JobManifest
from tests.conftest import fuzz_examples
from tests.gramine.test_gramine import job

INJECTED = '"\nloader.insecure__use_host_env = true\nsgx.allowed_files = ["file:/"]\n#'
JINJA = "{{ '" + INJECTED.replace("\n", "\\n").replace('"', '\\"') + "' }}"
HOSTILE = [
    INJECTED,
    JINJA,
    "{% raw %}x{% endraw %}",
    "{# comment #}",
    'a\\"b',
    "tab\tcr\rff\fbs\bnul-free \x7f \x1b",
    "\u2028\u2029\u0085",
    "caf\u00e9 \u6f22 \U0001f600",
    "'''\"\"\"",
    "]} = [",
]


def render(text: str) -> dict[str, Any]:
    """What gramine-manifest does with the template: Jinja2, then TOML."""
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    out = env.from_string(text).render(
        gramine={"libos": "/lib/libos.so", "runtimedir": lambda: "/rt"},
        arch_libdir="/lib/x86_64-linux-gnu",
    )
    return tomllib.loads(out)


def keys_of(doc: Any, prefix: str = "") -> set[str]:
    """Every dotted key path in a parsed TOML document (list items included)."""
    out: set[str] = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.add(prefix + k)
            out |= keys_of(v, f"{prefix}{k}.")
    elif isinstance(doc, list):
        for v in doc:
            out |= keys_of(v, prefix)
    return out


def assert_nothing_injected(doc: dict[str, Any]) -> None:
    assert set(doc) == {"loader", "libos", "fs", "sgx"}
    assert not any("insecure" in k for k in keys_of(doc)), sorted(keys_of(doc))
    assert set(doc["sgx"]) == {
        "remote_attestation", "debug", "enclave_size", "max_threads", "trusted_files",
    }  # fmt: skip
    assert set(doc["loader"]) == {"entrypoint", "argv", "log_level", "env"}
    assert doc["sgx"]["debug"] is False


def _ca(tmp_path: Path) -> Path:
    ca = tmp_path / "broker.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return ca


@pytest.mark.parametrize(
    "name",
    [
        "X\nloader.insecure__use_host_env",
        'A = "1"\nloader.insecure__use_host_env = true\nsgx.allowed_files = ["file:/"]\nB',
        "LANG\n",
        "1ABC",
        "A-B",
        "A.B",
        "A B",
        "\u00c4",
    ],
)
def test_env_name_with_newline_cannot_inject_gramine_manifest_keys(tmp_path: Path, name: str):
    ok = job(tmp_path)
    # at load: job.toml refuses the name in env.set and in env.allow
    text = (tmp_path / "job.toml").read_text()
    for table in (f'set = {{ {json.dumps(name)} = "true" }}', f"allow = [{json.dumps(name)}]"):
        bad = text.replace('allow = ["LANG"]\nset = { OMP_NUM_THREADS = "2" }', table)
        assert bad != text
        (tmp_path / "job.toml").write_text(bad)
        with pytest.raises(ManifestError, match="not an environment variable name"):
            JobManifest.load(tmp_path / "job.toml")
    # at generation: a manifest object made some other way is refused as well
    for m in (
        dataclasses.replace(ok, env_set={name: "true"}),
        dataclasses.replace(ok, env_allow=(name,)),
    ):
        with pytest.raises(ManifestError, match="not an environment variable name"):
            gramine_manifest(m, broker_ca=_ca(tmp_path))


def test_hostile_path_and_url_strings_cannot_add_gramine_manifest_keys(tmp_path: Path):
    ok = job(tmp_path)
    ca_dir = tmp_path / ('ca"\n{{ x }}')
    ca_dir.mkdir()
    ca = _ca(ca_dir)
    for hostile in HOSTILE:
        inp = dataclasses.replace(
            ok.inputs[0], path="/data/" + hostile, ciphertext=str(tmp_path / hostile)
        )
        m = dataclasses.replace(
            ok,
            argv=("/usr/bin/python3", hostile),
            env_set={"NOTE": hostile},
            inputs=(inp,),
            brokers=(dataclasses.replace(ok.brokers[0], url="https://broker.example:8443/" + hostile),),
        )  # fmt: skip
        text = gramine_manifest(m, broker_ca=ca)
        doc = render(text)
        assert_nothing_injected(doc)
        assert doc["loader"]["argv"] == ["/usr/bin/python3", hostile]
        assert doc["loader"]["env"]["NOTE"] == hostile
        enc = [x for x in doc["fs"]["mounts"] if x.get("type") == "encrypted"]
        assert enc[0]["path"] == "/data/" + hostile.rstrip("/")
        assert enc[0]["uri"] == "file:" + str(tmp_path / hostile).rstrip("/")
        uris = [t["uri"] for t in doc["sgx"]["trusted_files"] if isinstance(t, dict)]
        assert f"file:{ca}" in uris


# -- the emitter ------------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
_leaf = st.one_of(_text, st.booleans(), st.integers(-(2**63), 2**63 - 1))
_values = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(_text, inner, max_size=4).map(Inline),
    ),
    max_leaves=12,
)
_docs = st.dictionaries(
    _text, st.one_of(_values, st.dictionaries(_text, _values, min_size=1, max_size=4)), max_size=5
)


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(_docs)
def test_emitter_round_trips_through_tomllib(doc: dict[str, Any]):
    text = dumps(doc, header="generated")
    assert tomllib.loads(text) == _plain(doc)
    assert "{{" not in text.replace("{ ", "").replace(" }", "")  # no Jinja opener from data
    assert all(c >= " " and c != "\x7f" for c in text.replace("\n", ""))  # no control characters


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


@pytest.mark.parametrize("s", HOSTILE)
def test_emitter_keeps_hostile_strings_as_data_under_jinja_and_toml(s: str):
    doc = {"a": {s: s, "list": [s, Inline(k=s)]}}
    assert render(dumps(doc)) == {"a": {s: s, "list": [s, {"k": s}]}}


def test_only_template_strings_keep_their_placeholders():
    text = dumps({"t": Template("file:{{ gramine.libos }}"), "s": "{{ gramine.libos }}"})
    assert 't = "file:{{ gramine.libos }}"' in text
    assert render(text) == {"t": "file:/lib/libos.so", "s": "{{ gramine.libos }}"}


def test_emitter_refuses_what_toml_cannot_hold():
    with pytest.raises(ManifestError, match="not valid Unicode"):
        dumps({"a": "\ud800"})
    with pytest.raises(TypeError):
        dumps({"a": 1.5})  # type: ignore[dict-item]
