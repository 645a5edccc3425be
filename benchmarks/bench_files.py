"""Protected-file throughput, as ratios to raw AES-GCM measured in the same run.

Every figure is the median of ``--runs`` rounds; within a round all cases run back to back, so
the ratios compare like with like on a noisy shared machine. The plaintext and both ciphertexts
sit in the page cache (written just before and read once to warm); "tmpfs" outputs go to
/dev/shm. Run: ``make bench`` (writes docs/benchmarks.md) or ``python benchmarks/bench_files.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import mmap
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shieldml.files import Format, decrypt_file, encrypt_file, generate_key, open_protected
from shieldml.files._api import _align
from shieldml.files._gramine import native_accelerator
from shieldml.files._stream import StreamWriter

MIB = 1 << 20


def raw_aes_gcm(total: int, decrypt: bool) -> Callable[[], None]:
    """The physical limit: cryptography's AES-256-GCM on 1 MiB in-memory buffers."""
    aead = AESGCM(os.urandom(32))
    nonce = bytes(12)
    plain = os.urandom(MIB)
    ct = aead.encrypt(nonce, plain, None)
    n = total // MIB

    def run() -> None:
        for _ in range(n):
            if decrypt:
                aead.decrypt(nonce, ct, None)
            else:
                aead.encrypt(nonce, plain, None)

    return run


def _decrypt_part(path: Path, key: bytes, view: memoryview, start: int, end: int) -> None:
    with open_protected(path, key, bind="/bench") as f:
        f.seek(start)
        pos = start
        while pos < end:
            pos += f.readinto(view[pos - start : end - start])


def _bounds(path: Path, key: bytes, workers: int) -> list[int]:
    with open_protected(path, key, bind="/bench") as f:
        size = f.size
        return [0] + [_align(f, size * k // workers) for k in range(1, workers)] + [size]


def private_buffer(size: int) -> mmap.mmap:
    """A touched buffer that forked children do not inherit (MADV_DONTFORK).

    A plain bytearray is shared copy-on-write with every process the run forks (the worker rows
    do), after which the parent's next pass over it pays a write fault per 4 KiB page: whichever
    case happened to run next was charged about 0.4 ms per MiB that has nothing to do with it.
    """
    buf = mmap.mmap(-1, size)
    buf.madvise(mmap.MADV_DONTFORK)
    block = b"\1" * MIB
    for off in range(0, size, MIB):
        buf[off : off + MIB] = block[: min(MIB, size - off)]
    return buf


def read_into_memory(path: Path, key: bytes, buf: mmap.mmap) -> Callable[[], None]:
    """One process decrypts the whole file with ``readinto`` into a preallocated buffer."""

    def run() -> None:
        with memoryview(buf) as view:
            _decrypt_part(path, key, view, 0, len(buf))

    return run


def without_helper(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with the gramine-pf C helper switched off (the pure-Python reader)."""
    from shieldml.files import _gramine

    def run() -> None:
        saved, _gramine._native = _gramine._native, None
        try:
            fn()
        finally:
            _gramine._native = saved

    return run


class Workers:
    """Worker processes started before timing, each with its own preallocated, touched buffer.

    A timed run sends each worker its byte range and waits for all: the cost of decryption,
    not of starting processes or of faulting in fresh pages.
    """

    def __init__(self, n: int, size: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipes = []
        self.procs = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=self._loop, args=(child, size // n + 128 * MIB), daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)

    @staticmethod
    def _loop(conn: object, capacity: int) -> None:
        buf = bytearray(b"\1" * capacity)  # touched: no first-write page faults while timed
        with memoryview(buf) as view:
            while True:
                job = conn.recv()  # type: ignore[attr-defined]
                if job is None:
                    return
                _decrypt_part(*job[:2], view, *job[2:])
                conn.send(True)  # type: ignore[attr-defined]

    def decrypt(self, path: Path, key: bytes) -> Callable[[], None]:
        bounds = _bounds(path, key, len(self.pipes))

        def run() -> None:
            for pipe, (a, b) in zip(self.pipes, itertools.pairwise(bounds), strict=True):
                pipe.send((path, key, a, b))
            for pipe in self.pipes:
                if pipe.recv() is not True:
                    raise RuntimeError("worker failed")

        return run

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for p in self.procs:
            p.join()


def gramine_node_ceiling(total: int) -> Callable[[], None]:
    """What one process can do per gramine-pf node at best: key set-up + 4 KiB decrypt, no I/O."""
    keys = [os.urandom(16) for _ in range(96)]
    nodes = [bytearray(AESGCM(k).encrypt(bytes(12), os.urandom(4096), None)) for k in keys]
    out = memoryview(bytearray(4096))
    rounds = total // (96 * 4096)

    def run() -> None:
        for _ in range(rounds):
            for k, node in zip(keys, nodes, strict=True):
                AESGCM(k).decrypt_into(bytes(12), node, None, out)

    return run


def write_tmpfs(out: Path, size: int) -> Callable[[], None]:
    """The destination's own limit: writing plaintext to a new tmpfs file, no cryptography."""
    block = os.urandom(8 * MIB)

    def run() -> None:
        with out.open("wb") as f:
            for _ in range(size // len(block)):
                f.write(block)

    return run


def decrypt_to_tmpfs(path: Path, key: bytes, out: Path, workers: int) -> Callable[[], None]:
    def run() -> None:
        decrypt_file(path, out, key, bind="/bench", overwrite=True, workers=workers)

    return run


def encrypt_to(src: Path, key: bytes, out: Path | None, fmt: Format) -> Callable[[], None]:
    class Null:
        def write(self, b: object) -> None:
            pass

        def flush(self) -> None:
            pass

    def run() -> None:
        if out is not None:
            encrypt_file(src, out, key, fmt=fmt, bind="/bench", overwrite=True)
            return
        with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            w = StreamWriter(Null(), key, "/bench")  # type: ignore[arg-type]
            with memoryview(m) as view:
                for off in range(0, len(m), 8 * MIB):
                    w.write(view[off : off + 8 * MIB])
            w.close()

    return run


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", help="work directory (default: a temporary directory on disk)")
    ap.add_argument("--markdown", help="write the results page here")
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument(
        "--only",
        help="run only the cases containing one of these |-separated texts (and the raw rows)",
    )
    args = ap.parse_args()
    size = args.size_mib * MIB
    work = Path(args.dir or tempfile.mkdtemp(prefix="shieldml-bench-"))
    shm = Path(tempfile.mkdtemp(prefix="shieldml-bench-", dir="/dev/shm"))
    plain = work / "plain"
    with plain.open("wb") as f:
        block = os.urandom(16 * MIB)
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[: size % len(block)])
    skey, gkey = generate_key(Format.STREAM), generate_key(Format.GRAMINE_PF)
    senc, genc = work / "plain.stream", work / "plain.pf"
    encrypt_file(plain, senc, skey, bind="/bench")
    encrypt_file(plain, genc, gkey, fmt=Format.GRAMINE_PF, bind="/bench")
    for p in (plain, senc, genc):  # warm the page cache
        with p.open("rb") as f:
            while f.read(64 * MIB):
                pass
    buf = private_buffer(size)
    workers = Workers(2, size)
    cases: dict[str, Callable[[], None]] = {
        "raw AES-256-GCM decrypt, 1 MiB buffers": raw_aes_gcm(size, decrypt=True),
        "raw AES-256-GCM encrypt, 1 MiB buffers": raw_aes_gcm(size, decrypt=False),
        "stream decrypt readinto memory, 1 process": read_into_memory(senc, skey, buf),
        "stream decrypt readinto memory, 2 processes": workers.decrypt(senc, skey),
        "stream decrypt to tmpfs file, 1 process": decrypt_to_tmpfs(senc, skey, shm / "o", 1),
        "stream decrypt to tmpfs file, 2 processes": decrypt_to_tmpfs(senc, skey, shm / "o", 2),
        "reference: write plaintext to a new tmpfs file": write_tmpfs(shm / "o", size),
        "stream encrypt page cache -> memory sink": encrypt_to(plain, skey, None, Format.STREAM),
        "stream encrypt page cache -> tmpfs file": encrypt_to(
            plain, skey, shm / "o", Format.STREAM
        ),
        "gramine-pf decrypt readinto memory, 1 process": read_into_memory(genc, gkey, buf),
        "gramine-pf decrypt readinto memory, 2 processes": workers.decrypt(genc, gkey),
        "gramine-pf decrypt readinto memory, 1 process, Python reader (no C helper)": without_helper(
            read_into_memory(genc, gkey, buf)
        ),
        "gramine-pf ceiling: key set-up + decrypt per node, no I/O": gramine_node_ceiling(size),
        "gramine-pf encrypt page cache -> tmpfs file": encrypt_to(
            plain, gkey, shm / "o", Format.GRAMINE_PF
        ),
    }
    if args.only:
        cases = {
            k: v
            for k, v in cases.items()
            if k.startswith("raw") or any(o in k for o in args.only.split("|"))
        }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.runs):
        for name, fn in cases.items():
            (shm / "o").unlink(missing_ok=True)  # every tmpfs output starts as a new file
            times[name].append(timed(fn))
        print(f"round {r + 1}/{args.runs} done", file=sys.stderr)
    workers.close()
    gbps = {name: size / statistics.median(ts) / 1e9 for name, ts in times.items()}
    raw_dec = gbps["raw AES-256-GCM decrypt, 1 MiB buffers"]
    raw_enc = gbps["raw AES-256-GCM encrypt, 1 MiB buffers"]
    rows = []
    for name, rate in gbps.items():
        base = raw_enc if "encrypt" in name or "write" in name else raw_dec
        rows.append(
            {
                "case": name,
                "GB/s": round(rate, 3),
                "ratio_to_raw": round(rate / base, 3),
                "seconds_per_run": [round(t, 4) for t in times[name]],
            }
        )
    scaling = {}
    for fmt in ("stream", "gramine-pf"):
        one = gbps.get(f"{fmt} decrypt readinto memory, 1 process")
        two = gbps.get(f"{fmt} decrypt readinto memory, 2 processes")
        if one and two:
            scaling[f"{fmt} 2 processes / 1 process"] = round(two / one, 3)
    result = {
        "size_bytes": size,
        "runs": args.runs,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "gramine_pf_c_helper": native_accelerator(),
        "rows": rows,
        "scaling": scaling,
    }
    table = render(result)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.markdown:
        write_page(Path(args.markdown), table)
    for p in shm.iterdir():
        p.unlink()
    shm.rmdir()
    if not args.dir:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    return 0


def render(result: dict[str, object]) -> str:
    lines = [
        f"{result['size_bytes'] // MIB} MiB, median of {result['runs']} runs, "
        f"{result['cores']} cores, Python {result['python']}, gramine-pf C helper "
        f"{'built' if result.get('gramine_pf_c_helper') else 'NOT built'}",
        "",
        "| case | GB/s | ratio to raw AES-GCM |",
        "|---|---:|---:|",
    ]
    for row in result["rows"]:  # type: ignore[attr-defined]
        lines.append(f"| {row['case']} | {row['GB/s']:.2f} | {row['ratio_to_raw']:.2f} |")
    lines += ["", "| scaling | ratio |", "|---|---:|"]
    for name, value in result["scaling"].items():  # type: ignore[attr-defined]
        lines.append(f"| {name} | {value:.2f} |")
    return "\n".join(lines)


def write_page(path: Path, table: str, section: str = "bench_files") -> None:
    """Replace one generated section of the benchmarks page, keeping the hand-written text."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{table}\n{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())
