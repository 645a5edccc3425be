"""`shieldml demo`: an honest tour of what exists today (protected files), narrated.

It uses the same library calls as the CLI and prints the equivalent commands. The end-to-end
story (brokers, attestation, a shielded PyTorch job) replaces this once those parts exist.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from shieldml.errors import IntegrityError, ShieldError, WrongKeyError
from shieldml.files import (
    Format,
    decrypt_file,
    encrypt_file,
    generate_key,
    inspect_file,
    open_protected,
    write_key_file,
)

MODEL_SIZE = 48 << 20


def _fake_model(path: Path, size: int) -> None:
    """A deterministic stand-in for model weights (pseudo-random float32 bytes)."""
    block = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(32768))
    with path.open("wb") as f:
        left = size
        while left:
            f.write(block[: min(left, len(block))])
            left -= min(left, len(block))


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def run_demo(console: Console, workdir: str | None = None) -> None:
    """Play the demo; files go to ``workdir`` (kept) or a temporary directory (removed)."""
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="shieldml-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        _play(console, root)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _step(console: Console, title: str, command: str) -> None:
    console.print()
    console.rule(f"[bold]{title}")
    if command:
        console.print(f"[dim]$ {command}[/dim]")


def _play(c: Console, root: Path) -> None:
    c.print(
        Panel(
            "shieldml keeps models and data encrypted everywhere outside a TEE. "
            "This demo shows the first layer: protected files that are confidential, "
            "tamper-evident and bound to the path the program will open.",
            title="shieldml demo",
        )
    )
    model, enc, out, key = root / "model.bin", root / "model.bin.enc", root / "out.bin", root / "k"
    _fake_model(model, MODEL_SIZE)
    bind = "/workload/model.bin"

    _step(c, "1. The model owner creates a key", f"shieldml key new {key}")
    k = generate_key(Format.STREAM)
    write_key_file(key, k)
    c.print(f"32 random bytes, mode {oct(key.stat().st_mode & 0o777)}")

    cmd = f"shieldml encrypt {model} {enc} --key {key} --bind {bind}"
    _step(c, "2. ...and encrypts a 48 MiB model, bound to its in-TEE path", cmd)
    t = time.perf_counter()
    encrypt_file(model, enc, k, bind=bind)
    dt = time.perf_counter() - t
    c.print(f"{MODEL_SIZE / dt / 1e9:.2f} GB/s; ciphertext is {enc.stat().st_size} bytes")

    _step(c, "3. What anyone can see without the key", f"shieldml inspect {enc}")
    info = inspect_file(enc)
    table = Table(show_header=False)
    for name, value in info.to_dict().items():
        table.add_row(name, str(value))
    c.print(table)
    with enc.open("rb") as f:
        f.seek(4096)
        c.print(f"bytes at 4096: {f.read(24).hex()} (ciphertext)")

    _step(
        c,
        "4. Inside the TEE: decrypt and check",
        f"shieldml decrypt {enc} {out} --key {key} --bind {bind}",
    )
    decrypt_file(enc, out, k, bind=bind)
    same = _sha(out) == _sha(model)
    c.print(f"plaintext identical to the original: [bold]{'yes' if same else 'NO'}[/bold]")
    with open_protected(enc, k, bind=bind) as r:
        r.seek(30 << 20)
        c.print(f"random access: 16 bytes at 30 MiB = {r.read(16).hex()}")

    _step(c, "5. Attacks the host could try", "")
    _attack(c, "flip one bit in the middle of the file", enc, k, bind, flip=20 << 20)
    _attack(c, "truncate the last segment", enc, k, bind, truncate=True)
    _attack(c, "open it under another path (file swap)", enc, k, "/workload/other.bin")
    _attack(c, "use another key", enc, generate_key(Format.STREAM), bind)

    _step(
        c,
        "6. The same for Gramine/SGX: gramine-pf format",
        "shieldml encrypt ... --format gramine-pf",
    )
    gk = generate_key(Format.GRAMINE_PF)
    gpf = root / "model.pf"
    encrypt_file(model, gpf, gk, fmt=Format.GRAMINE_PF, bind="enc_files/model.bin")
    c.print(
        f"{gpf.stat().st_size} bytes, readable by Gramine's encrypted mounts "
        "(key_name, 16-byte key)"
    )
    _attack(
        c, "flip one bit in a gramine-pf data node", gpf, gk, "enc_files/model.bin", flip=10 << 20
    )
    c.print()
    c.print("[bold green]Every attack was detected; no unauthenticated plaintext was released.")


def _attack(
    c: Console,
    what: str,
    path: Path,
    key: bytes,
    bind: str,
    *,
    flip: int | None = None,
    truncate: bool = False,
) -> None:
    victim = path.with_suffix(".attacked")
    shutil.copyfile(path, victim)
    if flip is not None:
        with victim.open("r+b") as f:
            f.seek(flip)
            b = f.read(1)
            f.seek(flip)
            f.write(bytes([b[0] ^ 1]))
    if truncate:
        os.truncate(victim, victim.stat().st_size - 100)
    try:
        decrypt_file(victim, victim.with_suffix(".plain"), key, bind=bind, overwrite=True)
        c.print(f"[red]✗ {what}: NOT detected[/red]")
    except (IntegrityError, WrongKeyError) as e:
        c.print(
            f"[green]✓[/green] {what}: "
            f"[italic]{e.message.replace(str(victim), victim.name)}[/italic]"
        )
    except ShieldError as e:
        c.print(f"[green]✓[/green] {what}: {e.message}")
    finally:
        victim.unlink()
    if victim.with_suffix(".plain").exists():
        c.print("[red]  a plaintext output was left behind[/red]")
