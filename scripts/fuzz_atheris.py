"""Coverage-guided fuzzing of every parser of untrusted bytes with atheris (libFuzzer for Python).

    python scripts/fuzz_atheris.py [--seconds 60] [--only quote,http] [--json] [--markdown FILE]

Each target runs in its own process (libFuzzer owns the process and exits when done) for
``--seconds``, with shieldml's modules instrumented for coverage, a corpus seeded with real and
simulated evidence and protected files, a per-input timeout and an RSS limit. Only shieldml's own
errors (``ShieldError``) may escape a parser; the broker's HTTP app may answer anything but a 5xx.
Anything else is a finding: libFuzzer stops that target and leaves the input in the artifacts
folder. The table (executions, coverage, findings) goes to stdout, ``--json`` or ``docs/security.md``.

Seeds come from ``SHIELDML_VECTORS`` (default ``../shared/vectors``) when it exists, and from the
simulated platform always, so the script also works on a machine without the vectors.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the suite's broker policy (tests.broker.conftest), imported
# inside functions: in the fuzzing child, only after shieldml's modules are instrumented
NOW = datetime(2026, 11, 1, tzinfo=UTC)  # the simulated platform's certificates cover this
FILE_KEY = {"stream": bytes(range(32)), "gramine-pf": bytes(range(16))}
FIXED_NONCE = bytes(range(32))
# name -> (what it parses, max input length)
TARGETS: dict[str, tuple[str, int]] = {
    "quote": ("Intel DCAP quote parser (SGX/TDX, v3-v5)", 12000),
    "quote-verify": ("DCAP quote through full verification (simulated trust)", 12000),
    "snp": ("SEV-SNP report parser", 2000),
    "snp-verify": ("SEV-SNP report through full verification (simulated trust)", 2000),
    "ratls": ("RA-TLS certificate + quote/TCG extensions (PEM or DER)", 16000),
    "gramine-pf": ("gramine-pf header, metadata and MHT/data nodes", 40000),
    "stream": ("stream header and Tink segments", 40000),
    "policy": ("policy TOML", 4000),
    "manifest": ("job.toml manifest", 4000),
    "collateral": ("Intel collateral JSON (TCB info, QE identity)", 8000),
    "http": ("broker HTTP bodies: release, admin keys, policies", 16000),
}


# -- seeds (made in the driver, outside the instrumented child) ---------------------------------
def _seeds(target: str, sim_dir: Path) -> list[bytes]:
    from tests.broker.conftest import MRENCLAVE, POLICY
    from tests.conftest import vectors_dir

    from shieldml.files import encrypt_file
    from shieldml.files._common import Format
    from shieldml.testing.simulated import SimulatedPlatform, fixed_clock

    sim = SimulatedPlatform.open(sim_dir, clock=fixed_clock(NOW))
    vec = vectors_dir()  # SHIELDML_VECTORS, as the test suite finds them
    att = vec / "attestation" if vec else None
    out: list[bytes] = []

    def files(*globs: str) -> None:
        if att is not None:
            for g in globs:
                out.extend(p.read_bytes() for p in sorted(att.glob(g)) if p.is_file())

    if target in ("quote", "quote-verify"):
        out += [sim.sgx_quote(mrenclave=MRENCLAVE, now=NOW)[0], sim.tdx_quote(now=NOW)[0]]
        files("intel/*/*.bin", "intel/*/*.dat", "negative/sgx_*.bin", "negative/tdx_*.bin")
    elif target in ("snp", "snp-verify"):
        out.append(sim.snp_report(now=NOW)[0])
        files("amd/*/*report*.bin", "negative/snp_*.bin")
    elif target == "ratls":
        cert, _key = sim.ratls_certificate(mrenclave=MRENCLAVE, now=NOW)
        out.append(cert)
        files("ratls/*")
    elif target in ("gramine-pf", "stream"):
        fmt = Format(target)
        with tempfile.TemporaryDirectory() as d:
            for size in (0, 1, 3072, 3073, 5000, 20000):
                src, dst = Path(d) / "p", Path(d) / f"c{size}"
                src.write_bytes(bytes(i % 251 for i in range(size)))
                encrypt_file(src, dst, FILE_KEY[target], bind="f", fmt=fmt)
                out.append(dst.read_bytes())
    elif target == "policy":
        out.append(POLICY.encode())
    elif target == "manifest":
        from shieldml.runner import manifest

        example = (manifest.__doc__ or "").split("```toml\n")[1].split("```")[0]
        out.append(example.replace("\u2026", "ab" * 32).encode())
    elif target == "collateral":
        for tee in ("sgx", "tdx"):
            col = sim.collateral(tee, now=NOW)
            out.append(col.to_json().encode())
            doc = json.loads(col.to_json())
            out += [json.dumps(v).encode() for v in doc.values() if isinstance(v, dict | str)]
    elif target == "http":
        out += _http_seeds(sim)
    return [s for s in out if s] or [b"\0"]


def _http_seeds(sim: Any) -> list[bytes]:
    from tests.broker.conftest import MRENCLAVE, POLICY, WD

    from shieldml.broker import protocol

    rk = protocol.RunnerKey.generate("X25519")
    rd = protocol.report_data(FIXED_NONCE, rk.kem_id, rk.public_bytes, WD)
    quote, col = sim.sgx_quote(report_data=rd, mrenclave=MRENCLAVE, now=NOW)
    release = {
        "nonce": FIXED_NONCE.hex(),
        "evidence": base64.b64encode(quote).decode(),
        "collateral": json.loads(col.to_json()),
        "hpke_kem": "X25519",
        "hpke_public_key": base64.b64encode(rk.public_bytes).decode(),
        "workload_digest": WD,
        "keys": ["model"],
    }
    return [
        b"\0" + json.dumps(release).encode(),
        b"\1" + json.dumps({"name": "k1", "format": "stream", "replace": True}).encode(),
        b"\2" + json.dumps({"toml": POLICY}).encode(),
    ]


# -- the fuzzed side (runs in the child, with shieldml instrumented) ----------------------------
def _target(name: str, sim_dir: Path, work: Path) -> Callable[[bytes], None]:
    from shieldml.attest import Quote, SnpReport, extract, verify_evidence
    from shieldml.attest._intel_collateral import EnclaveIdentity, IntelCollateral, TcbInfo
    from shieldml.errors import ShieldError
    from shieldml.files import open_protected
    from shieldml.policy import Policy
    from shieldml.runner.manifest import JobManifest
    from shieldml.testing.simulated import SimulatedPlatform, fixed_clock

    sim = SimulatedPlatform.open(sim_dir, clock=fixed_clock(NOW))
    trust = sim.trust()
    scratch = work / "input"

    def tolerant(fn: Callable[[bytes], object]) -> Callable[[bytes], None]:
        def run(data: bytes) -> None:
            with contextlib.suppress(ShieldError):
                fn(data)

        return run

    if name == "quote":
        return tolerant(Quote.from_bytes)
    if name == "snp":
        return tolerant(SnpReport.from_bytes)
    if name == "ratls":
        return tolerant(extract)
    if name == "quote-verify":
        cols = {t: sim.collateral(t, now=NOW) for t in ("sgx", "tdx")}

        def quote_verify(data: bytes) -> None:
            for col in cols.values():
                verify_evidence(data, tee="auto", collateral=col, now=NOW, trust=trust)

        return tolerant(quote_verify)
    if name == "snp-verify":
        _report, vcek, chain = sim.snp_report(now=NOW)
        return tolerant(
            lambda data: verify_evidence(
                data, tee="snp", vcek=vcek, cert_chain=chain, now=NOW, trust=trust
            )
        )
    if name in ("gramine-pf", "stream"):
        key = FILE_KEY[name]

        def protected(data: bytes) -> None:
            scratch.write_bytes(data)
            with open_protected(scratch, key, bind="f") as f:
                f.read()
                f.seek(len(data) // 3)
                f.read(5000)

        return tolerant(protected)
    if name == "policy":
        return tolerant(lambda data: Policy.from_toml(data.decode("utf-8", "replace")))
    if name == "manifest":
        manifest = work / "job.toml"

        def load_manifest(data: bytes) -> None:
            manifest.write_bytes(data)
            JobManifest.load(manifest)

        return tolerant(load_manifest)
    if name == "collateral":

        def collateral(data: bytes) -> None:
            for parse in (IntelCollateral.from_json, TcbInfo.from_json, EnclaveIdentity.from_json):
                with contextlib.suppress(ShieldError):
                    parse(data)

        return collateral
    if name == "http":
        return _http_target(trust, work)
    raise SystemExit(f"unknown target {name!r}; known: {', '.join(TARGETS)}")


def _http_target(trust: Any, work: Path) -> Callable[[bytes], None]:
    """The broker's real ASGI app on SQLite, called in-process: any status but a 5xx is fine."""
    from tests.broker.conftest import POLICY

    from shieldml.broker.server.app import Settings, create_app
    from shieldml.broker.server.storage import Store, nonces_t

    store = Store(f"sqlite:///{work}/broker.db", work / "state")
    token = store.init_admin_token() or ""
    store.put_key("model", "stream", bytes(32), replace=True)
    store.set_policy("model", POLICY)
    app = create_app(store, Settings(trust=trust, now=lambda: NOW))
    with store.tx() as c:
        c.execute(nonces_t.insert().values(nonce=FIXED_NONCE.hex(), expires_at=NOW, used=False))
    routes = [
        ("POST", "/v1/release", []),
        ("POST", "/v1/admin/keys", [(b"authorization", f"Bearer {token}".encode())]),
        ("PUT", "/v1/admin/keys/model/policy", [(b"authorization", f"Bearer {token}".encode())]),
    ]
    loop = asyncio.new_event_loop()

    async def call(method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "https",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8443),
        }
        received = False
        status: list[int] = []

        async def receive() -> dict[str, Any]:
            nonlocal received
            if received:
                return {"type": "http.disconnect"}
            received = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        return status[0]

    def http(data: bytes) -> None:
        if not data:
            return
        method, path, headers = routes[data[0] % len(routes)]
        with store.tx() as c:  # the seed's nonce is live again for every input
            c.execute(
                nonces_t.update()
                .where(nonces_t.c.nonce == FIXED_NONCE.hex())
                .values(used=False, expires_at=store._clock() + timedelta(minutes=5))
            )
        code = loop.run_until_complete(call(method, path, headers, data[1:]))
        if code >= 500:
            raise RuntimeError(f"{method} {path} answered {code}")

    return http


def child(target: str, sim_dir: Path, libfuzzer_args: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["shieldml"]):
        import shieldml.attest
        import shieldml.broker.server.app
        import shieldml.files
        import shieldml.policy
        import shieldml.runner.manifest  # noqa: F401

    work = Path(tempfile.mkdtemp(prefix=f"shieldml-atheris-{target}-"))
    try:
        fn = _target(target, sim_dir, work)
        atheris.Setup([sys.argv[0], *libfuzzer_args], fn)
        atheris.Fuzz()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the driver ---------------------------------------------------------------------------------
def run_target(target: str, seconds: int, sim_dir: Path, out: Path, rss_mb: int) -> dict[str, Any]:
    corpus, artifacts = out / "corpus" / target, out / "artifacts"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(_seeds(target, sim_dir)):
        (corpus / f"seed-{i:03d}").write_bytes(seed)
    seeds = len(list(corpus.iterdir()))
    args = [
        f"-max_total_time={seconds}",
        f"-max_len={TARGETS[target][1]}",
        f"-rss_limit_mb={rss_mb}",
        "-timeout=20",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/{target}-",
        str(corpus),
    ]
    cmd = [sys.executable, __file__, "--child", target, "--sim", str(sim_dir), "--", *args]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    log = proc.stdout + proc.stderr
    (out / f"{target}.log").write_text(log)

    def stat(name: str) -> int:
        m = re.search(rf"stat::{name}:\s+(\d+)", log)
        return int(m.group(1)) if m else 0

    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", log)
    findings = sorted(p.name for p in artifacts.glob(f"{target}-*"))
    return {
        "target": target,
        "what": TARGETS[target][0],
        "seconds": round(time.monotonic() - started, 1),
        "executions": stat("number_of_executed_units"),
        "seeds": seeds,
        "corpus": int(cov[-1][2]) if cov else 0,
        "coverage": int(cov[-1][0]) if cov else 0,
        "features": int(cov[-1][1]) if cov else 0,
        "peak_rss_mb": stat("peak_rss_mb"),
        "exit": proc.returncode,
        "findings": findings,
        "error": "" if proc.returncode == 0 else log.strip().splitlines()[-1][:300],
    }


def markdown(rows: list[dict[str, Any]], seconds: int) -> str:
    total = sum(r["executions"] for r in rows)
    found = sum(len(r["findings"]) for r in rows)
    lines = [
        "<!-- atheris:begin (written by scripts/fuzz_atheris.py) -->",
        f"Coverage-guided (atheris {_atheris_version()}, libFuzzer), {seconds} s per target, "
        f"{datetime.now(UTC):%Y-%m-%d}: **{total:,} executions, "
        f"{found} finding{'' if found == 1 else 's'}**.",
        "",
        "| target | parses | executions | coverage (edges) | corpus | peak RSS | findings |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['what']} | {r['executions']:,} | {r['coverage']:,} | "
            f"{r['corpus']} | {r['peak_rss_mb']} MB | {', '.join(r['findings']) or 'none'} |"
        )
    lines.append("<!-- atheris:end -->")
    return "\n".join(lines)


def _atheris_version() -> str:
    from importlib.metadata import version

    return version("atheris")


def write_markdown(path: Path, table: str) -> None:
    text = path.read_text()
    pattern = re.compile(r"<!-- atheris:begin.*?<!-- atheris:end -->", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no <!-- atheris:begin --> ... <!-- atheris:end --> section")
    path.write_text(pattern.sub(lambda _m: table, text))


def main() -> int:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        sep = sys.argv.index("--")
        child(sys.argv[i + 1], Path(sys.argv[sys.argv.index("--sim") + 1]), sys.argv[sep + 1 :])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60, help="fuzzing time per target")
    ap.add_argument("--only", default="", help="comma-separated targets (default: all)")
    ap.add_argument("--rss-limit-mb", type=int, default=1024)
    ap.add_argument("--keep", type=Path, help="keep corpora, logs and artifacts here")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", type=Path, help="rewrite the atheris section of this file")
    a = ap.parse_args()
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install atheris (wheels for CPython 3.11-3.12)")
        return 2
    targets = [t for t in a.only.split(",") if t] or list(TARGETS)
    for t in targets:
        if t not in TARGETS:
            ap.error(f"unknown target {t!r}; known: {', '.join(TARGETS)}")
    out = a.keep or Path(tempfile.mkdtemp(prefix="shieldml-atheris-"))
    out.mkdir(parents=True, exist_ok=True)
    sim_dir = out / "sim"
    from shieldml.testing.simulated import SimulatedPlatform, fixed_clock

    if not sim_dir.exists():
        SimulatedPlatform.create(clock=fixed_clock(NOW)).save(sim_dir)
    rows = []
    for t in targets:
        print(f"fuzzing {t} for {a.seconds} s ...", file=sys.stderr, flush=True)
        row = run_target(t, a.seconds, sim_dir, out, a.rss_limit_mb)
        rows.append(row)
        print(
            f"  {row['executions']:,} executions, coverage {row['coverage']}, "
            f"findings: {', '.join(row['findings']) or 'none'}"
            + (f" (exit {row['exit']}: {row['error']})" if row["exit"] else ""),
            file=sys.stderr,
            flush=True,
        )
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        print(markdown(rows, a.seconds))
    if a.markdown:
        write_markdown(a.markdown, markdown(rows, a.seconds))
    if a.keep is None:
        shutil.rmtree(out, ignore_errors=True)
    else:
        print(f"corpora, logs and artifacts kept in {out}", file=sys.stderr)
    return 1 if any(r["findings"] or r["exit"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
