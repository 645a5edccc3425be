"""The job manifest (``job.toml``) and the workload digest derived from it.

```toml
version = 1
tee = "auto"                       # auto | simulated | sgx | tdx | snp ("gramine": old name of sgx)

[command]
argv = ["/usr/bin/python3", "infer.py"]  # argv[0] is an absolute path (never looked up on PATH)
cwd = "."                          # relative to the manifest's directory
insecure_allow_extra_args = false  # extra arguments on the `shieldml run` line

[env]
allow = ["LANG"]                   # names passed through; their values come from the host
set = { OMP_NUM_THREADS = "2", HOME = "/nonexistent" }  # fixed values (part of the digest)

[[trusted]]                        # code and configuration the job runs: path + SHA-256
path = "infer.py"
sha256 = "…"
[[trusted]]
glob = "lib/**/*.py"               # every match is hashed into the digest

[[broker]]
name = "model-owner"
url = "https://127.0.0.1:8443"
fingerprint = "…"                  # SHA-256 of the broker's TLS certificate

[[input]]
path = "model.pt"                  # what the program opens (relative to cwd, or absolute)
ciphertext = "enc/model.pt.enc"    # where the ciphertext lies on the host
key = "model"
broker = "model-owner"
format = "stream"                  # stream | gramine-pf

[[output]]
path = "result.txt"                # a file, or a directory if it ends with "/"
ciphertext = "out/result.txt.enc"
key = "results"
broker = "data-owner"

[tdx]                              # optional; TDX guests (Linux >= 6.16 tdx_guest measurements)
rtmr = 3                           # the RTMR the workload digest is extended into (2 or 3)
extend = "if-available"            # | "required" (refuse to run without it) | "off"

[gpu]                              # optional; NVIDIA confidential-computing GPUs (TDX, SEV-SNP)
evidence = "nvml"                  # each GPU's SPDM report through NVML goes with each release
collateral = "nvidia/"             # optional: RIMs (*.xml, *.swidtag) and OCSP responses
                                   # (*.der) sent with it (signed by NVIDIA; not measured)

[serve]                            # optional; `shieldml serve`: the program is a model server
port = 8000                        # where it listens on 127.0.0.1 (measured)
ready_path = "/"                   # answered (any status) once it is up (measured)
ready_timeout = 120                # seconds to wait for that (not measured)
listen = "0.0.0.0:8443"            # the public TLS address (not measured; --listen overrides)
```

``[serve]``, when present, is part of the workload digest (``port`` and ``ready_path``: where the
decrypted requests go); ``listen`` and ``ready_timeout`` are the operator's (the evidence, not the
address, tells a client what it reached). ``docs/serving.md``.

``[gpu]``, when present, is part of the workload digest (``evidence`` only: the collateral is
signed, so whoever placed it does not matter). The runner then sends every GPU's evidence with
each release, bound to that release's CPU evidence (docs/protocol.md, "GPU evidence").

``[tdx]``, when present, is part of the workload digest. Before its first evidence the runner
extends the RTMR once with ``SHA-384("shieldml/v1 workload rtmr\\0" || workload digest)``
(:func:`shieldml.runner.evidence.rtmr_extend_value`), so a TDX policy can pin the RTMR a VM
reaches after running exactly this job (:func:`shieldml.runner.evidence.expected_rtmr`).

The **workload digest** is ``sha256:`` + SHA-256 over the canonical JSON of the manifest's content
(paths resolved relative to its directory, trusted files listed with their hashes). Changing the
script, the manifest, or any trusted file changes it.

What the host controls and the manifest therefore refuses (issue 12):

- ``env.allow`` names are measured, their values are not: the host picks them. A name that decides
  which code runs or where it is loaded from (``PATH``, ``HOME``, ``PYTHON*``, ``LD_*``, …: see
  `FORBIDDEN_ALLOW` and `FORBIDDEN_ALLOW_PREFIXES`) may not be passed through; give it a fixed
  value in ``env.set`` instead. ``env.set`` takes any name: its value is part of the digest the
  owners approve (whatever code such a value points to must itself be trusted or part of the
  measured image).
- ``command.argv[0]`` is an absolute path, so no ``PATH`` (the host's or the program's) chooses
  the executable.
- No protected path is equal to or inside another (component by component: ``/a/b`` and
  ``/a/bc`` are unrelated): a mount inside another owner's decrypted directory would hand one
  owner's plaintext to the other's output. No protected path is a trusted file or a directory
  that holds one: the mount would hide the measured file (files beside a trusted file are fine).
- ``shieldml run`` hashes every trusted file in full; only ``shieldml job measure`` (the owner's
  side) may use a `HashCache`.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import itertools
import json
import os
import re
import stat
import string
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeGuard

from shieldml.attest import TEE_NAMES, canonical_tee
from shieldml.errors import (
    EvidenceError,
    ManifestError,
    ShieldError,
    TrustedFileError,
    unknown_fields_hint,
)
from shieldml.files import GRAMINE_PATH_MAX, gramine_norm_path

#: what ``tee`` may say: detect, the simulated TEE, or one of the canonical TEE names (``gramine``,
#: the older name of ``sgx``, is accepted with a deprecation warning)
TEES = ("auto", "simulated", *TEE_NAMES)
RTMR_EXTEND = ("if-available", "required", "off")
EXTENDABLE_RTMRS = (2, 3)  # RTMR0/1 hold the firmware's and the boot loader's measurements
FORMATS = ("stream", "gramine-pf")
MAX_MANIFEST = 1 << 20
#: What an environment variable name in ``[env]`` may be (POSIX portable names): a newline or a
#: quote in a name would otherwise reach the Gramine manifest generated from the job (issue 13).
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


def valid_env_name(name: str) -> bool:
    """Whether ``name`` is ``^[A-Za-z_][A-Za-z0-9_]*$`` (a full match: no trailing newline)."""
    return ENV_NAME.fullmatch(name) is not None


# Names ``env.allow`` refuses: each decides which code runs, or where code, configuration that
# loads code, or caches of compiled code are read from. Tuning variables (OMP_NUM_THREADS,
# MKL_NUM_THREADS, CUDA_VISIBLE_DEVICES, NCCL_DEBUG, LANG, LC_*, TZ, …) stay allowed. Compared
# in upper case: nothing needs a lower-case spelling of these.
FORBIDDEN_ALLOW = frozenset(
    {
        # the shell and the process: executable search, start-up files, working directories
        *("PATH", "HOME", "PWD", "OLDPWD", "SHELL", "ENV", "BASH_ENV", "IFS", "CDPATH"),
        *("SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND", "TMPDIR", "TMP", "TEMP"),
        # glibc: conversion modules, locale data, allocator and tunables, resolver files
        *("GCONV_PATH", "LOCPATH", "NLSPATH", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN"),
        # other interpreters and runtimes a job may start
        *("JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH", "LUA_PATH"),
        *("LUA_CPATH", "TCLLIBPATH", "GEM_HOME", "GEM_PATH"),
        # OpenSSL configuration loads engines and providers (shared objects)
        *("OPENSSL_CONF", "OPENSSL_MODULES", "OPENSSL_ENGINES"),
        # OpenMP tools interface: loads the libraries it names
        *("OMP_TOOL", "OMP_TOOL_LIBRARIES", "OMP_TOOL_VERBOSE_INIT"),
        # compilers and headers used by just-in-time compilation (torch.compile, triton, cpp_extension)
        *("CC", "CXX", "CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH", "LIBRARY_PATH"),
        # PyTorch, Triton, CUDA: extensions, compiled kernels and their caches, toolkits, plugins
        *("TORCH_HOME", "TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR"),
        "PYTORCH_KERNEL_CACHE_PATH",
        *("TRITON_HOME", "TRITON_CACHE_DIR", "TRITON_LIBCUDA_PATH", "TRITON_PTXAS_PATH"),
        *("CUDA_HOME", "CUDA_PATH", "CUDA_CACHE_PATH", "CUDA_ROOT"),
        *("NCCL_NET_PLUGIN", "NCCL_TUNER_PLUGIN", "NCCL_PROFILER_PLUGIN"),
        # Hugging Face: `trust_remote_code` modules and caches
        *("HF_HOME", "HF_MODULES_CACHE", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE"),
    }
)
FORBIDDEN_ALLOW_PREFIXES = (
    "PYTHON",  # PYTHONPATH, PYTHONHOME, PYTHONSTARTUP, PYTHONUSERBASE, PYTHONPYCACHEPREFIX, …
    "LD_",  # LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, …
    "DYLD_",
    "MALLOC_",
    "RESOLV_",
    "BASH_",  # BASH_ENV, exported functions (BASH_FUNC_*)
    "PERL",  # PERL5LIB, PERL5OPT, PERLLIB
    "RUBY",  # RUBYLIB, RUBYOPT
    "NODE_",  # NODE_OPTIONS, NODE_PATH
    "XDG_",  # configuration, data and cache directories
    "GCONV_",
)


@dataclass(frozen=True)
class Broker:
    name: str
    url: str
    fingerprint: str | None = None


@dataclass(frozen=True, kw_only=True)
class Protected:
    path: str  # in-TEE path, absolute after loading
    ciphertext: str  # host path, absolute after loading
    key: str  # "" for an output sealed to a recipient
    broker: str  # "" likewise
    format: str = "stream"
    recipient: str | None = None  # X25519 public key file (outputs only): seal to it with HPKE
    recipient_key: bytes | None = None  # its 32 bytes, read once at load (measured, then used)
    sha256: str | None = (
        None  # inputs only: the ciphertext this job must read (rollback protection)
    )
    #: the path the protected file is bound to when it differs from ``path`` (a file that
    #: Gramine's ``pf-crypt`` encrypted for a relative stored path, say); exactly as written
    bind: str | None = None

    @property
    def is_dir(self) -> bool:
        return self.path.endswith("/")

    @property
    def bound(self) -> str:
        """The path the file (a directory: each file under it, as ``bound/relative``) must be
        bound to: ``bind``, or the in-TEE path."""
        return self.bind if self.bind is not None else self.path.rstrip("/")


@dataclass(frozen=True)
class Trusted:
    path: str | None
    glob: str | None
    sha256: str | None


@dataclass(frozen=True)
class TdxSettings:
    """``[tdx]``: which RTMR the runner extends with the workload digest, and whether it must."""

    rtmr: int = 3
    extend: str = "if-available"  # one of RTMR_EXTEND


@dataclass(frozen=True)
class GpuSettings:
    """``[gpu]``: collect NVIDIA GPU evidence (through NVML) for every release."""

    evidence: str = "nvml"
    collateral: str | None = None  # a directory of RIMs and OCSP responses, relative to the job


@dataclass(frozen=True)
class ServeSettings:
    """``[serve]``: the program is a model server on ``127.0.0.1:port`` (``shieldml serve``)."""

    port: int
    ready_path: str = "/"
    ready_timeout: float = 120.0
    listen: str = "0.0.0.0:8443"

    def measured(self) -> dict[str, Any]:
        return {"port": self.port, "ready_path": self.ready_path}


def _serve(d: Any, where: str) -> ServeSettings:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: [serve] must be a table")
    _only(d, {"port", "ready_path", "ready_timeout", "listen"}, where)
    port = d.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ManifestError(f"{where}: port must be the program's TCP port (1-65535)")
    path = d.get("ready_path", "/")
    if not isinstance(path, str) or not re.fullmatch(r"/[!-~]{0,1000}", path):
        raise ManifestError(f"{where}: ready_path must be an absolute URL path without spaces")
    timeout = d.get("ready_timeout", 120)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout <= 3600:
        raise ManifestError(f"{where}: ready_timeout must be seconds (0-3600)")
    listen = d.get("listen", "0.0.0.0:8443")
    if not isinstance(listen, str) or not re.fullmatch(
        r"\[?[0-9A-Za-z.:\-]+\]?:[0-9]{1,5}", listen
    ):
        raise ManifestError(f"{where}: listen must be HOST:PORT")
    return ServeSettings(port, path, float(timeout), listen)


@dataclass(frozen=True, kw_only=True)
class JobManifest:
    source: Path
    tee: str
    argv: tuple[str, ...]
    cwd: str
    insecure_allow_extra_args: bool
    env_allow: tuple[str, ...]
    env_set: dict[str, str]
    trusted: tuple[Trusted, ...]
    brokers: tuple[Broker, ...]
    inputs: tuple[Protected, ...]
    outputs: tuple[Protected, ...]
    simulated: dict[str, str] = field(default_factory=dict)
    tdx: TdxSettings | None = None  # None: no [tdx] table (the defaults apply, nothing measured)
    gpu: GpuSettings | None = None  # None: no GPU evidence
    serve: ServeSettings | None = None  # None: no [serve] table (a batch job)
    #: ``tee`` as the file spells it, where that is a deprecated name (``gramine``): the workload
    #: digest keeps it, so policies pinned to a digest before the rename still match
    tee_spelled: str | None = None

    @property
    def base(self) -> Path:
        return self.source.parent

    @property
    def tdx_settings(self) -> TdxSettings:
        return self.tdx or TdxSettings()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> JobManifest:
        p = Path(path).resolve()
        try:
            with p.open("rb") as f:
                raw = f.read(MAX_MANIFEST + 1)  # never more than the limit into memory
            if len(raw) > MAX_MANIFEST:
                raise ManifestError(f"{path}: manifest too large")
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path}: cannot read the job manifest: {e}") from e
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ManifestError(f"{path}: not valid TOML: {e}") from e
        return cls.from_dict(doc, p)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: Path) -> JobManifest:
        where = str(source)
        _only(
            d,
            {
                "version",
                "tee",
                "command",
                "env",
                "trusted",
                "broker",
                "input",
                "output",
                "simulated",
                "tdx",
                "gpu",
                "serve",
            },
            where,
        )
        if d.get("version", 1) != 1:
            raise ManifestError(f"{where}: unsupported manifest version {d.get('version')!r}")
        spelled = d.get("tee", "auto")
        tee = canonical_tee(spelled, f"{where}: tee") if isinstance(spelled, str) else spelled
        if tee not in TEES:
            raise ManifestError(f"{where}: tee must be one of {', '.join(TEES)}")
        cmd = d.get("command")
        if not isinstance(cmd, dict):
            raise ManifestError(f"{where}: [command] with argv is required")
        _only(cmd, {"argv", "cwd", "insecure_allow_extra_args"}, f"{where}: [command]")
        argv = cmd.get("argv")
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(a, str) and a for a in argv)
        ):
            raise ManifestError(f"{where}: command.argv must be a non-empty list of strings")
        if any("\0" in a for a in argv):
            raise ManifestError(f"{where}: command.argv holds a NUL character")
        if not PurePosixPath(argv[0]).is_absolute():
            raise ManifestError(
                f"{where}: command.argv[0] must be an absolute path, not {argv[0]!r}: a bare or "
                "relative name is looked up on a PATH or in a directory the host controls",
                hint='name the interpreter by its absolute path, e.g. argv = ["/usr/bin/python3", '
                '"infer.py"] (`shieldml job init` writes one)',
            )
        base = source.parent
        cwd = str((base / str(cmd.get("cwd", "."))).resolve())
        env = d.get("env", {})
        _only(env, {"allow", "set"}, f"{where}: [env]")
        allow = env.get("allow", [])
        env_set = env.get("set", {})
        if (
            not isinstance(allow, list)
            or not isinstance(env_set, dict)
            or not all(isinstance(x, str) for x in allow)
            or not all(isinstance(v, str) for v in env_set.values())
        ):
            raise ManifestError(f"{where}: env.allow must list names, env.set map names to strings")
        for name in [*allow, *env_set]:
            if not valid_env_name(name):
                raise ManifestError(
                    f"{where}: {name[:80]!r} is not an environment variable name "
                    "(letters, digits and '_', not starting with a digit)"
                )
        if any("\0" in v for v in env_set.values()):
            raise ManifestError(f"{where}: an env.set value holds a NUL character")
        for name in allow:
            if forbidden_in_allow(name):
                raise ManifestError(
                    f"{where}: env.allow may not pass {name} through (the host would choose its "
                    "value, and it decides which code runs or where code is loaded from); "
                    "give it a fixed value in env.set instead: env.set values are measured",
                    hint=f'e.g. [env] set = {{ {name} = "…" }}, or leave it out',
                )
        trusted = tuple(
            _trusted(t, f"{where}: trusted {i + 1}")
            for i, t in enumerate(_tables(d, "trusted", where))
        )
        brokers = tuple(
            _broker(b, f"{where}: broker {i + 1}")
            for i, b in enumerate(_tables(d, "broker", where))
        )
        names = {b.name for b in brokers}
        if len(names) != len(brokers):
            raise ManifestError(f"{where}: broker names must be unique")
        ins = tuple(
            _protected(x, cwd, base, names, f"{where}: input {i + 1}")
            for i, x in enumerate(_tables(d, "input", where))
        )
        outs = tuple(
            _protected(x, cwd, base, names, f"{where}: output {i + 1}", output=True)
            for i, x in enumerate(_tables(d, "output", where))
        )
        labelled = [(f"input {i + 1}", x) for i, x in enumerate(ins)] + [
            (f"output {i + 1}", x) for i, x in enumerate(outs)
        ]
        _no_nesting(labelled, where)
        _no_shared_binds(labelled, where)
        _no_protected_trusted(
            labelled,
            [str((base / t.path).resolve()) for t in trusted if t.path is not None],
            where,
        )
        sim = d.get("simulated", {})
        if not isinstance(sim, dict) or not all(isinstance(v, str) for v in sim.values()):
            raise ManifestError(f"{where}: [simulated] maps names to strings")
        tdx = _tdx(d["tdx"], tee, f"{where}: [tdx]") if "tdx" in d else None
        gpu = _gpu(d["gpu"], tee, sim, f"{where}: [gpu]") if "gpu" in d else None
        serve = _serve(d["serve"], f"{where}: [serve]") if "serve" in d else None
        return cls(
            source=source,
            tee=tee,
            tee_spelled=spelled if spelled != tee else None,
            argv=tuple(argv),
            cwd=cwd,
            insecure_allow_extra_args=bool(cmd.get("insecure_allow_extra_args", False)),
            env_allow=tuple(allow),
            env_set=dict(env_set),
            trusted=trusted,
            brokers=brokers,
            inputs=ins,
            outputs=outs,
            simulated=dict(sim),
            tdx=tdx,
            gpu=gpu,
            serve=serve,
        )

    # -- trusted files and the workload digest ---------------------------------------------------
    def trusted_files(
        self, cache: HashCache | None = None, keep: dict[str, tuple[int, bytes]] | None = None
    ) -> list[tuple[str, str]]:
        """``(absolute path, sha256)`` of every trusted file; raises on any mismatch or absence, or
        when a protected path would hide a trusted file (globs are expanded only here).

        ``cache`` is for `shieldml job measure` on the owner's side; a run never passes one.
        With ``keep``, each file is read once and hashed from the bytes kept there (``path ->
        (mode, bytes)``): the run places exactly those bytes in the program's private root."""

        def measure(p: str) -> str:
            if keep is None:
                return sha256_file(p, cache)
            mode, data = read_trusted(p)
            keep[str(Path(p).resolve())] = (mode, data)
            if sum(len(d) for _m, d in keep.values()) > MAX_TRUSTED_BYTES:
                raise TrustedFileError(
                    f"the trusted files exceed {MAX_TRUSTED_BYTES >> 20} MiB",
                    hint="trusted files are code; put large data in protected inputs",
                )
            return hashlib.sha256(data).hexdigest()

        out: dict[str, str] = {}
        problems: list[str] = []
        for t in self.trusted:
            if t.path is not None:
                p = str((self.base / t.path).resolve())
                try:
                    digest = measure(p)
                except OSError as e:
                    problems.append(f"{t.path}: {e.strerror}")
                    continue
                if t.sha256 is not None and digest != t.sha256.lower():
                    problems.append(f"{t.path}: SHA-256 is {digest}, the manifest says {t.sha256}")
                out[p] = digest
            else:
                matches = sorted(glob.glob(str(self.base / (t.glob or "")), recursive=True))
                files = [m for m in matches if Path(m).is_file()]
                if not files:
                    problems.append(f"{t.glob}: matches no file")
                for m in files:
                    out[str(Path(m).resolve())] = measure(m)
        if problems:
            raise TrustedFileError(
                "trusted files do not match the manifest: " + "; ".join(problems),
                hint="the job was changed; the owners' policies pin its digest (`shieldml job measure`)",
            )
        labelled = [(f"input {i + 1}", x) for i, x in enumerate(self.inputs)] + [
            (f"output {i + 1}", x) for i, x in enumerate(self.outputs)
        ]
        _no_protected_trusted(labelled, list(out), str(self.source))
        return sorted(out.items())

    def canonical(self, files: list[tuple[str, str]]) -> dict[str, Any]:
        base = str(self.base)

        def rel(p: str) -> str:
            return os.path.relpath(p, base) if p.startswith(base + os.sep) or p == base else p

        doc: dict[str, Any] = {
            "shieldml_job": 1,
            "tee": self.tee_spelled or self.tee,
            "argv": list(self.argv),
            "cwd": rel(self.cwd),
            "insecure_allow_extra_args": self.insecure_allow_extra_args,
            "env_allow": sorted(self.env_allow),
            "env_set": dict(sorted(self.env_set.items())),
            "trusted_files": [[rel(p), h] for p, h in files],
            "brokers": [asdict(b) for b in sorted(self.brokers, key=lambda b: b.name)],
            "inputs": [_protected_doc(x, rel) for x in self.inputs],
            "outputs": [_protected_doc(x, rel) for x in self.outputs],
        }  # [simulated] describes the stand-in hardware, not the workload: it is not measured
        if self.tdx is not None:
            doc["tdx"] = asdict(self.tdx)
        if self.gpu is not None:
            doc["gpu"] = {"evidence": self.gpu.evidence}
        if self.serve is not None:
            doc["serve"] = self.serve.measured()
        return doc

    def workload_digest(
        self, cache: HashCache | None = None, keep: dict[str, tuple[int, bytes]] | None = None
    ) -> str:
        doc = self.canonical(self.trusted_files(cache, keep))
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _protected_doc(x: Protected, rel: Any) -> dict[str, Any]:
    """A protected path in the digest; a recipient is measured by its key, not its file name."""
    doc = {
        "path": x.path,
        "ciphertext": rel(x.ciphertext),
        "key": x.key,
        "broker": x.broker,
        "format": x.format,
    }
    if x.recipient_key is not None:
        doc["recipient_sha256"] = hashlib.sha256(x.recipient_key).hexdigest()
    if x.sha256 is not None:
        doc["ciphertext_sha256"] = x.sha256
    if x.bind is not None:
        doc["bind"] = x.bind
    return doc


class HashCache:
    """SHA-256 of files keyed by (path, size, mtime_ns, inode), kept in a JSON file."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path else None
        self.entries: dict[str, list[Any]] = {}
        if self.path and self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def get(self, p: str, st: os.stat_result) -> str | None:
        e = self.entries.get(p)
        return e[3] if e and e[:3] == [st.st_size, st.st_mtime_ns, st.st_ino] else None

    def put(self, p: str, st: os.stat_result, digest: str) -> None:
        self.entries[p] = [st.st_size, st.st_mtime_ns, st.st_ino, digest]

    def save(self) -> None:
        if self.path:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.entries))
            tmp.replace(self.path)


def ciphertext_digest(path: str | os.PathLike[str]) -> str:
    """What an input's ``sha256`` pins: the file's SHA-256, or for a directory the SHA-256 of the
    canonical JSON map of its files' SHA-256s."""
    return combined_digest(tree_sha256(path))


def combined_digest(tree: dict[str, str]) -> str:
    """:func:`ciphertext_digest` from a :func:`tree_sha256` map (however its bytes were read)."""
    if list(tree) == [""]:
        return tree[""]
    return hashlib.sha256(
        json.dumps(tree, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def tree_sha256(path: str | os.PathLike[str]) -> dict[str, str]:
    """SHA-256 of a file (key ``""``) or of every file under a directory (keys: relative paths)."""
    p = Path(path)
    if p.is_dir():
        return {
            str(f.relative_to(p)): sha256_file(str(f)) for f in sorted(p.rglob("*")) if f.is_file()
        }
    return {"": sha256_file(str(p))}


MAX_TRUSTED_BYTES = 512 << 20


def read_trusted(path: str) -> tuple[int, bytes]:
    """A trusted file's permission bits and bytes, from one descriptor (no symbolic link last)."""
    fd = os.open(str(Path(path).resolve()), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return stat.S_IMODE(st.st_mode), b"".join(chunks)
    finally:
        os.close(fd)


def sha256_file(path: str, cache: HashCache | None = None) -> str:
    st = Path(path).stat()
    if cache is not None and (hit := cache.get(path, st)) is not None:
        return hit
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    if cache is not None:
        cache.put(path, st, digest)
    return digest


def forbidden_in_allow(name: str) -> bool:
    """Whether ``env.allow`` refuses ``name`` (`FORBIDDEN_ALLOW`, `FORBIDDEN_ALLOW_PREFIXES`)."""
    upper = name.upper()
    return upper in FORBIDDEN_ALLOW or upper.startswith(FORBIDDEN_ALLOW_PREFIXES)


def _parts(path: str) -> tuple[str, ...]:
    """An absolute in-TEE path as its components (a directory's trailing ``/`` dropped)."""
    return PurePosixPath(path.rstrip("/") or "/").parts


def _first_overlap(
    items: list[tuple[str, Protected]], parts: Callable[[Protected], tuple[str, ...]]
) -> tuple[tuple[str, Protected], tuple[str, Protected], bool] | None:
    """The first two items whose ``parts`` are equal or one inside the other, component by
    component (``/a/bc`` is not in ``/a/b``), and whether they are equal. Sorted by components, a
    path comes right before the first of those inside it, so comparing neighbours finds every
    case in O(n log n)."""
    ordered = sorted(items, key=lambda item: parts(item[1]))
    for first, second in itertools.pairwise(ordered):
        pa, pb = parts(first[1]), parts(second[1])
        if pb[: len(pa)] == pa:
            return first, second, pa == pb
    return None


def _no_nesting(items: list[tuple[str, Protected]], where: str) -> None:
    """No protected path equal to or inside another."""
    found = _first_overlap(items, lambda p: _parts(p.path))
    if found is not None:
        (la, a), (lb, b), same = found
        what = "is the same path as" if same else "contains"
        raise ManifestError(
            f"{where}: {la} ({a.path}) {what} {lb} ({b.path}): "
            "a protected path may not be equal to or inside another",
            hint="give each input and output its own path, none under another's directory",
        )


def _no_shared_binds(items: list[tuple[str, Protected]], where: str) -> None:
    """No two protected paths bound to the same path, or one under the other (compared as
    Gramine normalises paths): the host could swap such files, and each would still
    authenticate at the other's place."""
    found = _first_overlap(items, lambda p: _parts(gramine_norm_path(p.bound)))
    if found is not None:
        (la, a), (lb, b), same = found
        what = "the same path as" if same else "a path that contains"
        raise ManifestError(
            f"{where}: {la} is bound to {a.bound!r}, {what} {lb} ({b.bound!r}): "
            "the host could swap their files and each would open at the other's place",
            hint="give each protected file its own bind (`shieldml rebind` re-encrypts one)",
        )


def _no_protected_trusted(items: list[tuple[str, Protected]], files: list[str], where: str) -> None:
    """No protected path that is a trusted file or one of its directories (the mount would hide
    the measured file)."""
    protected = {_parts(x.path): (label, x) for label, x in items}
    for f in files:
        parts = _parts(f)
        for n in range(1, len(parts) + 1):
            if (hit := protected.get(parts[:n])) is not None:
                label, x = hit
                raise ManifestError(
                    f"{where}: {label} ({x.path}) would hide the trusted file {f}: "
                    "a protected path may not be a trusted file or a directory that holds one",
                    hint="keep trusted files outside the protected paths (beside them is fine)",
                )


def _tables(d: dict[str, Any], key: str, where: str) -> list[Any]:
    """``[[key]]``: an array of tables (each checked by its own parser), empty when absent."""
    v = d.get(key, [])
    if not isinstance(v, list):
        raise ManifestError(f"{where}: {key} must be an array of tables ([[{key}]])")
    return v


def _only(d: Any, allowed: set[str], where: str) -> None:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: must be a table")
    unknown = set(d) - allowed
    if unknown:
        raise ManifestError(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))}",
            hint=unknown_fields_hint(unknown, allowed),
        )


def _is_sha256_hex(v: object) -> TypeGuard[str]:
    """A SHA-256 written as 64 hex digits, either case."""
    return isinstance(v, str) and len(v) == 64 and all(c in string.hexdigits for c in v)


def _trusted(t: Any, where: str) -> Trusted:
    _only(t, {"path", "glob", "sha256"}, where)
    if ("path" in t) == ("glob" in t):
        raise ManifestError(f"{where}: give exactly one of path or glob")
    sha = t.get("sha256")
    if "path" in t and not _is_sha256_hex(sha):
        raise ManifestError(
            f"{where}: a trusted path needs its sha256 (64 hex digits); `shieldml job init` fills it"
        )
    if "glob" in t and any(ch in str(t["glob"]) for ch in "\0"):
        raise ManifestError(f"{where}: bad glob")
    return Trusted(t.get("path"), t.get("glob"), sha)


def _tdx(t: Any, tee: str, where: str) -> TdxSettings:
    _only(t, {"rtmr", "extend"}, where)
    rtmr, extend = t.get("rtmr", 3), t.get("extend", "if-available")
    if isinstance(rtmr, bool) or rtmr not in EXTENDABLE_RTMRS:
        raise ManifestError(
            f"{where}: rtmr must be 2 or 3, not {rtmr!r}",
            hint="RTMR0 and RTMR1 hold the firmware's and the boot loader's measurements",
        )
    if extend not in RTMR_EXTEND:
        raise ManifestError(f"{where}: extend must be one of {', '.join(RTMR_EXTEND)}")
    if extend == "required" and tee in ("snp", "sgx"):
        raise ManifestError(
            f'{where}: extend = "required" with tee = "{tee}": only TDX has RTMRs',
            hint='use tee = "tdx" (or "auto"), or extend = "if-available"',
        )
    return TdxSettings(int(rtmr), str(extend))


def _gpu(g: Any, tee: str, sim: dict[str, str], where: str) -> GpuSettings:
    if not isinstance(g, dict):
        raise ManifestError(f"{where}: must be a table")
    _only(g, {"evidence", "collateral"}, where)
    if g.get("evidence", "nvml") != "nvml":
        raise ManifestError(f'{where}: evidence must be "nvml"')
    if tee == "gramine" or (tee == "simulated" and sim.get("kind", "sgx") not in ("tdx", "snp")):
        raise ManifestError(
            f'{where}: GPU evidence needs a confidential VM (tee = "tdx", "snp" or "auto"; '
            'simulated: [simulated] kind = "tdx" or "snp")'
        )
    if tee == "simulated":
        from shieldml.runner.gpu import simulated_gpu_settings

        try:
            simulated_gpu_settings(sim)
        except EvidenceError as e:
            raise ManifestError(f"{where}: {e.message}") from None
    collateral = g.get("collateral")
    if collateral is not None and (not isinstance(collateral, str) or not collateral):
        raise ManifestError(f"{where}: collateral must be a directory path")
    return GpuSettings("nvml", collateral)


def _broker(b: Any, where: str) -> Broker:
    _only(b, {"name", "url", "fingerprint"}, where)
    if not isinstance(b.get("name"), str) or not isinstance(b.get("url"), str):
        raise ManifestError(f"{where}: name and url are required")
    if b["url"].startswith("https://") and not b.get("fingerprint"):
        raise ManifestError(f"{where}: an https broker needs its TLS fingerprint")
    return Broker(b["name"], b["url"], b.get("fingerprint"))


def _protected(
    x: Any, cwd: str, base: Path, brokers: set[str], where: str, *, output: bool = False
) -> Protected:
    _only(
        x,
        {
            "path",
            "ciphertext",
            "key",
            "broker",
            "format",
            "bind",
            *(("recipient",) if output else ("sha256",)),
        },
        where,
    )
    recipient = x.get("recipient")
    needed = ("path", "ciphertext") if recipient else ("path", "ciphertext", "key", "broker")
    for k in needed:
        if not isinstance(x.get(k), str) or not x[k]:
            raise ManifestError(f"{where}: {k} is required")
    if recipient is not None:
        if not isinstance(recipient, str) or "key" in x or "broker" in x:
            raise ManifestError(
                f"{where}: an output goes either to a recipient or to a key on a broker"
            )
        x = {**x, "key": "", "broker": ""}
    elif x["broker"] not in brokers:
        raise ManifestError(f"{where}: unknown broker {x['broker']!r}")
    fmt = x.get("format", "stream")
    if fmt not in FORMATS:
        raise ManifestError(f"{where}: format must be stream or gramine-pf")
    is_dir = x["path"].endswith("/")
    path = str((Path(cwd) / x["path"]).resolve()) + ("/" if is_dir else "")
    rec = str((base / recipient).resolve()) if recipient else None
    rec_key = None
    if rec is not None:
        try:
            rec_key = Path(rec).read_bytes()
        except OSError as e:
            raise ManifestError(
                f"{where}: cannot read recipient key {recipient}: {e.strerror}"
            ) from e
        if len(rec_key) != 32:
            raise ManifestError(
                f"{where}: {recipient} is not a 32-byte X25519 public key (`shieldml key recipient`)"
            )
    pin = x.get("sha256")
    if pin is not None and not _is_sha256_hex(pin):
        raise ManifestError(
            f"{where}: sha256 pins the input's ciphertext: 64 hex digits (`shieldml job measure --json`)"
        )
    return Protected(
        path=path,
        ciphertext=str((base / x["ciphertext"]).resolve()),
        key=x["key"],
        broker=x["broker"],
        format=fmt,
        recipient=rec,
        recipient_key=rec_key,
        sha256=pin.lower() if pin else None,
        bind=_bind(x.get("bind"), fmt, is_dir=is_dir, recipient=recipient, where=where),
    )


def _bind(bind: Any, fmt: str, *, is_dir: bool, recipient: Any, where: str) -> str | None:
    """An input's or output's ``bind``: the path its file was encrypted for, kept exactly as
    written (never resolved against the manifest's directory: it is compared with the path
    stored in, or derived into, the file). A directory's is the root its files are bound under."""
    if bind is None:
        return None
    if recipient is not None:
        raise ManifestError(
            f"{where}: an output sealed to a recipient is bound to its in-TEE path (the receipt "
            "names it): bind goes with a broker key"
        )
    if not isinstance(bind, str) or not bind.strip("/") or "\0" in bind:
        raise ManifestError(
            f"{where}: bind must be the non-empty path the file was encrypted for",
            hint="`shieldml inspect FILE --key KEY` shows a gramine-pf file's bound path",
        )
    text = bind.rstrip("/") if is_dir else bind
    if text.endswith("/"):
        raise ManifestError(f"{where}: bind {bind!r} ends with '/', but path is a file")
    if fmt == "gramine-pf" and len(gramine_norm_path(text).encode()) >= GRAMINE_PATH_MAX:
        raise ManifestError(f"{where}: bind is too long for a Gramine protected file")
    return text


# -- writing manifests: `shieldml job init` ---------------------------------------------------------
# A TOML emitter for what a manifest holds: strings, booleans, integers, arrays and inline tables as
# values; top-level tables and arrays of tables. tomllib reads back exactly the document given.

_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string: quotes, backslashes and control characters escaped."""
    chars = []
    for ch in text:
        if ch in _ESCAPES:
            chars.append(_ESCAPES[ch])
        elif ch < " " or ch == "\x7f":
            chars.append(f"\\u{ord(ch):04X}")
        elif "\ud800" <= ch <= "\udfff":
            raise ManifestError(
                f"{text!r} is not valid Unicode (a name in another encoding than UTF-8?): "
                "a TOML manifest cannot hold it"
            )
        else:
            chars.append(ch)
    return '"' + "".join(chars) + '"'


def _toml_key(key: str) -> str:
    return key if key and set(key) <= _BARE_KEY else toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return (
            "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    raise TypeError(f"no TOML form for a manifest value of type {type(value).__name__}")


def _is_table_array(value: Any) -> bool:
    return (
        isinstance(value, list | tuple) and bool(value) and all(isinstance(v, dict) for v in value)
    )


def to_toml(doc: dict[str, Any], comments: dict[str, str] | None = None) -> str:
    """``doc`` as TOML: its plain values first, then a ``[table]`` for each dict and a
    ``[[table]]`` for each list of dicts (nested dicts and lists become inline values).

    ``comments`` maps ``"key"`` or ``"table.key"`` to a comment at the end of that line, and a
    table's name to comment lines under its header (one per line of the text).
    """
    notes = comments or {}

    def line(path: str, key: str, value: Any) -> str:
        text = f"{_toml_key(key)} = {_toml_value(value)}"
        note = notes.get(path)
        return f"{text}  # {note}" if note else text

    def body(name: str, table: dict[str, Any]) -> list[str]:
        lines = [f"# {c}" if c else "#" for c in notes[name].splitlines()] if name in notes else []
        return lines + [line(f"{name}.{k}", k, v) for k, v in table.items()]

    tables = {k: v for k, v in doc.items() if isinstance(v, dict) or _is_table_array(v)}
    lines = [line(k, k, v) for k, v in doc.items() if k not in tables]
    for name, value in tables.items():
        for table in [value] if isinstance(value, dict) else value:
            header = f"[{_toml_key(name)}]" if isinstance(value, dict) else f"[[{_toml_key(name)}]]"
            lines += ["", header, *body(name, table)] if lines else [header, *body(name, table)]
    return "\n".join(lines) + "\n"


_SCAFFOLD_COMMENTS = {
    "command.cwd": "the script's directory",
    "gpu": "every GPU's attestation report (NVML) goes with every release; collateral = DIR of\n"
    "NVIDIA's RIMs (*.xml) and OCSP responses (*.der) for the broker (docs/runner.md)",
    "simulated.gpus": "simulated GPUs; gpu_cc = on | devtools | off, gpu_driver, gpu_vbios",
    "env": "names passed through from the host, which chooses their values; PATH, HOME, PYTHON*,\n"
    "LD_* and other names that decide what code runs are refused: give those fixed values in\n"
    '`set`, e.g. set = { OMP_NUM_THREADS = "4" }',
}
_SCAFFOLD_EXAMPLES = """
# [[broker]]
# name = "model-owner"
# url = "https://127.0.0.1:8443"
# fingerprint = "…"

# [[input]]
# path = "model.pt"
# ciphertext = "enc/model.pt.enc"
# key = "model"
# broker = "model-owner"

# [[output]]
# path = "result.txt"
# ciphertext = "out/result.txt.enc"
# key = "results"
# broker = "model-owner"
"""


def scaffold_manifest(
    files: list[str] | tuple[str, ...],
    *,
    output: str | os.PathLike[str],
    tee: str,
    interpreter: str,
    simulated_platform: str | os.PathLike[str] = "sim-platform",
    gpus: int | None = None,
    brokers: list[dict[str, Any]] | None = None,
    inputs: list[dict[str, Any]] | None = None,
    outputs: list[dict[str, Any]] | None = None,
) -> str:
    """The text of a new manifest at ``output``: ``interpreter`` runs the first of ``files`` from
    its directory; every file is trusted with its SHA-256 now; the ``brokers``, ``inputs`` and
    ``outputs`` tables given (see :func:`scaffold_protected`), or commented examples of them to
    fill in. Paths are relative to the manifest's directory where they lie below it.
    ``tee = "simulated"`` gets ``[simulated] platform = simulated_platform`` (a relative path is
    taken from the current directory and written relative to the manifest's). ``gpus``: a
    ``[gpu]`` table (simulated: a TDX VM with that many simulated GPUs)."""
    tee = canonical_tee(tee, "--tee")
    if tee not in TEES:
        raise ManifestError(f"tee must be one of {', '.join(TEES)}")
    if not files:
        raise ManifestError("a manifest needs the script it runs")
    base = Path(output).resolve().parent

    def rel(p: Path) -> str:
        return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)

    script = Path(files[0]).resolve()
    doc: dict[str, Any] = {
        "version": 1,
        "tee": tee,
        "command": {"argv": [interpreter, script.name], "cwd": rel(script.parent)},
        "env": {"allow": ["LANG"]},
    }
    if tee == "simulated":
        doc["simulated"] = {"platform": rel(Path(simulated_platform).absolute()), "kind": "sgx"}
        if gpus is not None:
            doc["simulated"].update({"kind": "tdx", "gpus": str(gpus)})
    if gpus is not None:
        doc["gpu"] = {"evidence": "nvml"}
    doc["trusted"] = [
        {"path": rel(p), "sha256": sha256_file(str(p))} for p in (Path(f).resolve() for f in files)
    ]
    for name, tables in (("broker", brokers), ("input", inputs), ("output", outputs)):
        if tables:
            doc[name] = tables
    return to_toml(doc, _SCAFFOLD_COMMENTS) + ("" if inputs or outputs else _SCAFFOLD_EXAMPLES)


def _written(p: Path, base: Path) -> str:
    """``p`` as a manifest writes it: relative to ``base`` where it lies below it."""
    return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)


def scaffold_protected(
    spec: str,
    *,
    output: bool,
    cwd: Path,
    base: Path,
    key: str,
    broker: str,
    fmt: str | None = None,
    key_files: list[bytes] | tuple[bytes, ...] = (),
) -> dict[str, Any]:
    """The ``[[input]]`` or ``[[output]]`` table for ``spec``, as `shieldml job init` writes it.

    ``spec`` is ``FILE`` (the ciphertext lies where the program opens it, as in Gramine's
    tutorial: same name, same place) or ``PATH=CIPHERTEXT`` (``PATH`` relative to the job's
    working directory ``cwd``, ``CIPHERTEXT`` to the current directory); a directory ends with
    ``/``. An input must be a protected file (or a directory of them); its format comes from its
    magic. Its ``bind`` is read with one of ``key_files`` (the owner's keys, on the owner's
    machine): a gramine-pf file's stored path (written only where it is not the in-TEE path),
    or the first of (the in-TEE path, CIPHERTEXT as given) a stream file opens at. An output
    gets ``fmt``. Raises ManifestError with the command that fixes the problem.
    """
    from shieldml.files import detect_format

    if "=" in spec and not Path(spec).exists():
        where, ct_text = spec.split("=", 1)
        tee = Path(where) if Path(where).is_absolute() else cwd / where
    else:
        where, ct_text = spec, spec
        tee = Path(spec).absolute()
    if not where or not ct_text:
        raise ManifestError(f"{spec}: give FILE or PATH=CIPHERTEXT")
    ct = Path(ct_text).resolve()
    is_dir = where.endswith("/") or (not output and ct.is_dir())
    tee_path = str(tee.resolve())
    shown = _written(Path(tee_path), cwd) + ("/" if is_dir else "")
    table: dict[str, Any] = {"path": shown, "ciphertext": _written(ct, base)}
    table |= {"key": key, "broker": broker}
    if output:
        table["format"] = fmt or "stream"
        return table
    if not ct.exists():
        raise ManifestError(f"input {ct_text}: no such file or directory")
    members = sorted(f for f in ct.rglob("*") if f.is_file()) if ct.is_dir() else [ct]
    if not members:
        raise ManifestError(f"input {ct_text}: an empty directory")
    try:
        formats = {detect_format(f).value for f in members}
    except ShieldError as e:
        raise ManifestError(
            f"input {ct_text}: {e.message}",
            hint=f"encrypt it first, for the path the program opens: `shieldml encrypt PLAIN "
            f"{ct_text} --key KEY --bind {tee_path}`",
        ) from None
    if len(formats) > 1:
        raise ManifestError(f"input {ct_text}: holds files of both formats")
    table["format"] = fmt_in = formats.pop()
    bind = _found_bind(ct, members, tee_path, ct_text, fmt_in, key_files)
    if bind is not None:
        table["bind"] = bind
    return table


def _found_bind(
    ct: Path,
    members: list[Path],
    tee_path: str,
    ct_text: str,
    fmt: str,
    key_files: list[bytes] | tuple[bytes, ...],
) -> str | None:
    """The ``bind`` an input needs (``None``: it is bound to its in-TEE path), read with the
    owner's keys; see :func:`scaffold_protected`."""
    from shieldml.files import Format, inspect_file, open_protected

    size = Format(fmt).key_size
    keys = [k for k in key_files if len(k) == size]
    rels = [f.relative_to(ct).as_posix() if ct.is_dir() else "" for f in members]

    def joined(root: str, rel: str) -> str:
        return f"{root.rstrip('/')}/{rel}" if rel else root

    if fmt == "gramine-pf":
        if not keys:
            raise ManifestError(
                f"input {ct_text}: a gramine-pf file keeps the path it was encrypted for in its "
                "encrypted metadata: give its key (--key-file) so job init can read it",
                hint="the key stays on this machine; job init only reads the stored path",
            )
        for k in keys:
            try:
                stored = [inspect_file(f, k).bound_path or "" for f in members]
            except ShieldError:
                continue
            root = stored[0][: len(stored[0]) - len(rels[0]) - 1] if rels[0] else stored[0]
            if any(
                s != gramine_norm_path(joined(root, r)) for s, r in zip(stored, rels, strict=True)
            ):
                raise ManifestError(
                    f"input {ct_text}: its files are not bound under one directory "
                    f"({stored[0]!r}, …)",
                    hint="`shieldml rebind` them to the directory's in-TEE path",
                )
            return None if gramine_norm_path(root) == gramine_norm_path(tee_path) else root
        raise ManifestError(f"input {ct_text}: none of the --key-file keys opens it")
    if not keys:
        return None  # a stream file: assumed bound to its in-TEE path (the runner checks it)
    for candidate in (tee_path, ct_text.rstrip("/")):
        for k in keys:
            try:
                for f, r in zip(members, rels, strict=True):
                    with open_protected(f, k, bind=joined(candidate, r)) as pf:
                        pf.read(1)
            except ShieldError:
                continue
            return None if candidate == tee_path else candidate
    raise ManifestError(
        f"input {ct_text}: it opens neither at {tee_path} nor at {ct_text} with the keys given",
        hint=f"re-encrypt it for the path the program opens: `shieldml rebind {ct_text} --key "
        f"KEY --bind OLD --to {tee_path}`",
    )
