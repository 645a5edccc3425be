"""Whole processes side by side on tmpfs: the CLI against ``cp``, gramine-pf against Gramine.

Every case is a complete process writing a new file on tmpfs (default ``/dev/shm``), started
fresh each time; each round runs every case once, back to back, and the tables give the median
over ``--rounds`` rounds of the wall time, with each ratio the median of the per-round ratios
(the machine may be shared: only ratios measured in the same round mean much).

- *CLI* (section ``bench_cli``): ``shieldml decrypt`` of a ``stream`` file against ``cp`` of the
  same ciphertext, ``shieldml encrypt`` against ``cp`` of the plaintext, with the break-down:
  a process that only imports the CLI (interpreter and import start-up), and one that only
  calls ``decrypt_file`` (the library, no CLI).
- *Gramine* (section ``bench_gramine``): Gramine's own ``pf-crypt`` (``SHIELDML_GRAMINE_PF``,
  default ``../shared/tools/gramine-pf``: v1.9 writes format v2, v1.8 format v1) against
  ``shieldml encrypt/decrypt --format gramine-pf`` on the same input; rows for a missing tool
  say so.

Run: ``make bench`` or ``python benchmarks/bench_peers.py [--size-mib 1024] [--dir /dev/shm]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_files import write_page

REPO = Path(__file__).resolve().parents[1]
Cmd = list[str]


def _tools() -> Path:
    env = os.environ.get("SHIELDML_GRAMINE_PF")
    return Path(env) if env else REPO.parent / "shared" / "tools" / "gramine-pf"


def run_once(cmd: Cmd, out: Path, env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and minor page faults of one process."""
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-400:]}")
    out.unlink(missing_ok=True)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_minflt


def measure(
    cases: dict[str, tuple[Cmd, Path]], rounds: int, env: dict[str, str]
) -> dict[str, list[tuple[float, float, int]]]:
    res: dict[str, list[tuple[float, float, int]]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, (cmd, out) in cases.items():
            res[name].append(run_once(cmd, out, env))
    return res


def _ratio(res: dict[str, list[tuple[float, float, int]]], a: str, b: str) -> float:
    """Median over rounds of wall(a) / wall(b)."""
    return statistics.median(x[0] / y[0] for x, y in zip(res[a], res[b], strict=True))


def _med(res: dict[str, list[tuple[float, float, int]]], name: str, i: int) -> float:
    return statistics.median(r[i] for r in res[name])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm", help="a tmpfs directory")
    ap.add_argument("--markdown", help="write the results into this page")
    args = ap.parse_args()
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cli = [py, "-m", "shieldml.cli"]
    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="shieldml-bench-") as tmp:
        d = Path(tmp)
        plain, out = d / "plain.bin", d / "out"
        with plain.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        subprocess.run(
            [*cli, "key", "new", str(d / "s.key")], env=env, check=True, stdout=subprocess.DEVNULL
        )
        subprocess.run(
            [*cli, "key", "new", str(d / "g.key"), "--format", "gramine-pf"],
            env=env, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        stream = d / "c.stream"
        subprocess.run(
            [*cli, "encrypt", str(plain), str(stream), "--key", str(d / "s.key")],
            env=env, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        dec = [*cli, "decrypt", str(stream), str(out), "--key", str(d / "s.key")]
        lib = (
            "import sys; from shieldml.files import decrypt_file, load_key; "
            "decrypt_file(sys.argv[1], sys.argv[2], load_key(sys.argv[3]), workers=int(sys.argv[4]))"
        )
        cli_cases: dict[str, tuple[Cmd, Path]] = {
            "cp ciphertext -> new tmpfs file": (["cp", str(stream), str(out)], out),
            "shieldml decrypt (default: automatic workers)": (dec, out),
            "shieldml decrypt --workers 1": ([*dec, "--workers", "1"], out),
            f"shieldml decrypt --workers {cpus}": ([*dec, "--workers", str(cpus)], out),
            "library only: decrypt_file, 1 process": (
                [py, "-c", lib, str(stream), str(out), str(d / "s.key"), "1"],
                out,
            ),
            "start-up only: python -c 'import shieldml.cli'": (
                [py, "-c", "import shieldml.cli"],
                out,
            ),
            "start-up only: python -c 'import shieldml.files'": (
                [py, "-c", "import shieldml.files"],
                out,
            ),
            "cp plaintext -> new tmpfs file": (["cp", str(plain), str(out)], out),
            "shieldml encrypt": (
                [*cli, "encrypt", str(plain), str(out), "--key", str(d / "s.key"), "--force"],
                out,
            ),
        }
        res = measure(cli_cases, args.rounds, env)
        lines = [
            f"{args.size_mib} MiB onto a new file on tmpfs, whole processes, {args.rounds} "
            f"interleaved rounds, {cpus} cores, load average at the start "
            f"{os.getloadavg()[0]:.1f}; speed = cp's wall time / this row's (median of the "
            "per-round ratios; 1.00 = as fast as cp)",
            "",
            "| process | wall s | CPU s | minor faults | speed vs cp |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in cli_cases:
            ref = (
                "cp plaintext -> new tmpfs file"
                if "encrypt" in name or "plaintext" in name
                else "cp ciphertext -> new tmpfs file"
            )
            lines.append(
                f"| {name} | {_med(res, name, 0):.3f} | {_med(res, name, 1):.3f} | "
                f"{int(_med(res, name, 2))} | {_ratio(res, ref, name):.2f} |"
            )
        cli_table = "\n".join(lines)
        print(cli_table)

        tools = _tools()
        g_cases: dict[str, tuple[Cmd, Path]] = {}
        missing = []
        for tag, version in (("v1.9", 2), ("v1.8", 1)):
            tool = tools / tag / "pf-crypt"
            if not os.access(tool, os.X_OK):
                missing.append(f"Gramine {tag}: pf-crypt not found at {tool} (SHIELDML_GRAMINE_PF)")
                continue
            enc = d / f"c{version}.pf"
            subprocess.run(
                [str(tool), "encrypt", "-w", str(d / "g.key"), "-i", str(plain), "-o", str(enc)],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            g_cases[f"Gramine {tag} pf-crypt encrypt (v{version})"] = (
                [str(tool), "encrypt", "-w", str(d / "g.key"), "-i", str(plain), "-o", str(out)],
                out,
            )
            g_cases[f"shieldml encrypt --format gramine-pf --gramine-version {version}"] = (
                [*cli, "encrypt", str(plain), str(out), "--key", str(d / "g.key"),
                 "--format", "gramine-pf", "--gramine-version", str(version), "--force"],
                out,
            )  # fmt: skip
            g_cases[f"Gramine {tag} pf-crypt decrypt (v{version})"] = (
                [str(tool), "decrypt", "-w", str(d / "g.key"), "-i", str(enc), "-o", str(out)],
                out,
            )
            for w in (1, cpus):
                g_cases[f"shieldml decrypt (v{version}) --workers {w}"] = (
                    [*cli, "decrypt", str(enc), str(out), "--key", str(d / "g.key"),
                     "--workers", str(w)],
                    out,
                )  # fmt: skip
        gres = measure(g_cases, args.rounds, env) if g_cases else {}
        lines = [
            f"{args.size_mib} MiB onto a new file on tmpfs, whole processes, {args.rounds} "
            "interleaved rounds; speed-up = Gramine's wall time / shieldml's in the same round "
            "(median of the per-round ratios)",
            "",
            "| process | wall s | CPU s | speed-up over Gramine |",
            "|---|---:|---:|---:|",
        ]
        for name in g_cases:
            if name.startswith("Gramine"):
                lines.append(
                    f"| {name} | {_med(gres, name, 0):.3f} | {_med(gres, name, 1):.3f} | 1.00 |"
                )
                peer = name
            else:
                lines.append(
                    f"| {name} | {_med(gres, name, 0):.3f} | {_med(gres, name, 1):.3f} | "
                    f"{_ratio(gres, peer, name):.2f} |"
                )
        lines += [f"| {m} | n/a | n/a | n/a |" for m in missing]
        g_table = "\n".join(lines)
        print(g_table)
    if args.markdown:
        write_page(Path(args.markdown), cli_table, "bench_cli")
        write_page(Path(args.markdown), g_table, "bench_gramine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
