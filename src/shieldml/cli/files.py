"""``shieldml key new|recipient``, ``encrypt``, ``decrypt``, ``rekey``, ``inspect``: protected
files and their keys."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

import click

from shieldml.cli._common import (
    AT_OPTION,
    EXISTING_FILE,
    FORMAT_CHOICE,
    JSON_OPTION,
    load_policy,
    parse_time,
    receipt_trust,
    simulated_platform_option,
    trust_root_options,
)
from shieldml.cli._output import emit, emit_json, emit_json_line, err, escape, out, progress_bar
from shieldml.errors import InputReadError, IntegrityError, ShieldError
from shieldml.files import (
    Format,
    Planned,
    atomic_output,
    decrypt_path,
    decrypt_stream,
    encrypt_path,
    encrypt_stream,
    generate_key,
    inspect_file,
    load_key,
    open_protected,
    plan_decrypt,
    plan_encrypt,
    rebind_path,
    rekey_path,
    write_key_file,
)


@click.group()
def key() -> None:
    """Create keys for protected files."""


@key.command("recipient")
@click.argument("out_path", metavar="OUT", type=click.Path(dir_okay=False))
@JSON_OPTION
def key_recipient(out_path: str, as_json: bool) -> None:
    """Write an X25519 recipient key pair: OUT (private, 0600) and OUT.pub (for job manifests)."""
    from shieldml.runner.recipient import new_recipient

    pub = new_recipient(out_path)
    emit(
        {"private": out_path, "public": str(pub)},
        as_json,
        f"wrote {escape(out_path)} (private, mode 0600) and {escape(str(pub))}",
    )


@key.command("new")
@click.argument("out_path", metavar="OUT", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=FORMAT_CHOICE, default="stream", show_default=True)
@JSON_OPTION
def key_new(out_path: str, fmt: str, as_json: bool) -> None:
    """Write a new random key to OUT (mode 0600; never overwrites).

    stream keys are 32 raw bytes; gramine-pf keys are Gramine's 16-byte wrap-key files.
    """
    f = Format(fmt)
    write_key_file(out_path, generate_key(f))
    emit(
        {"path": out_path, "format": f.value, "size": f.key_size},
        as_json,
        f"wrote a new {f} key ({f.key_size} bytes, mode 0600) to {out_path}",
        sort_keys=True,
    )


@click.command()
@click.argument("src", metavar="IN", type=click.Path(exists=True, allow_dash=True))
@click.argument("dst", metavar="OUT", type=click.Path(allow_dash=True))
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False), help="Key file.")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default="stream", show_default=True)
@click.option(
    "--bind",
    help="Path the program will open inside the TEE (for a directory: the directory's path). "
    "Default: OUT as given, as Gramine's pf-crypt stores it.",
)
@click.option("--gramine-version", type=click.Choice(["1", "2"]), default="1", show_default=True)
@click.option("--force", is_flag=True, help="Replace existing output files.")
@JSON_OPTION
def encrypt(
    src: str,
    dst: str,
    key_path: str,
    fmt: str,
    bind: str | None,
    gramine_version: str,
    force: bool,
    as_json: bool,
) -> None:
    """Encrypt IN (a file or a directory, recursively) into OUT.

    IN `-` reads standard input to its end; OUT `-` writes standard output (stream format only,
    with --bind; gramine-pf writes its first node last and needs a file). The report then goes to
    standard error.
    """
    f = Format(fmt)
    k = load_key(key_path, f)
    if STDIO in (src, dst):
        _encrypt_stdio(src, dst, k, f, bind, int(gramine_version), force, as_json)
        return
    items = plan_encrypt(src, dst, bind)
    with progress_bar(sum(i.size for i in items), "encrypting") as tick:
        encrypt_path(
            src,
            dst,
            k,
            fmt=f,
            gramine_version=int(gramine_version),
            overwrite=force,
            progress=tick,
            planned=items,
        )
    _report(as_json, "encrypted", items, f.value)


@click.command()
@click.argument("src", metavar="IN", type=click.Path(exists=True, allow_dash=True))
@click.argument("dst", metavar="OUT", type=click.Path(allow_dash=True))
@click.option("--key", "key_path", type=click.Path(dir_okay=False), help="Key file.")
@click.option(
    "--recipient-key",
    type=EXISTING_FILE,
    help="Private recipient key, for outputs a runner sealed to its public key"
    " (with --receipt and --policy).",
)
@click.option(
    "--receipt",
    "receipt_file",
    type=EXISTING_FILE,
    help="With --recipient-key: the run's receipt, which must list IN's sealed key.",
)
@click.option(
    "--policy",
    "policy_file",
    type=EXISTING_FILE,
    help="With --recipient-key: the release policy the receipt's TEE must satisfy.",
)
@AT_OPTION
@trust_root_options
@simulated_platform_option
@click.option("--bind", help="Path the file was bound to at encryption. Default: IN as given.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="Processes per file. Default: one per idle core for files of 64 MiB and more, else 1.",
)
@click.option("--force", is_flag=True, help="Replace existing output files.")
@JSON_OPTION
def decrypt(
    src: str,
    dst: str,
    key_path: str | None,
    recipient_key: str | None,
    receipt_file: str | None,
    policy_file: str | None,
    at: str | None,
    trust_root: tuple[str, ...],
    insecure_custom_root: bool,
    simulated_platform: str | None,
    bind: str | None,
    workers: int | None,
    force: bool,
    as_json: bool,
) -> None:
    """Decrypt IN (a file or a directory, recursively) into OUT.

    Nothing is written at OUT unless all of it verifies. An output a runner sealed to a
    recipient's public key opens only with the run's receipt: anyone holding the public key can
    seal a key, so the receipt (verified against --policy) must list IN's sealed key; the
    in-TEE path to decrypt with is the one the receipt names.

    IN `-` reads a stream file from standard input (with --bind; gramine-pf needs random access
    and a path); OUT `-` writes standard output, the report going to standard error. Output to
    standard output is written a segment at a time, each only after it authenticated: a
    non-zero exit after some output means what was written is an authenticated prefix only, to
    be discarded. To a file (OUT not `-`) nothing appears unless all of it verified.
    """
    if (key_path is None) == (recipient_key is None):
        raise click.UsageError("give exactly one of --key and --recipient-key")
    if src == STDIO and recipient_key is not None:
        raise click.UsageError(
            "--recipient-key needs IN to be a file: its sealed key is read from IN.sealed-key"
        )
    if recipient_key is not None:
        if receipt_file is None or policy_file is None:
            raise click.UsageError(
                "--recipient-key needs --receipt and --policy: HPKE does not say who sealed the"
                " key, so the run's receipt, accepted by the owner's policy, must vouch for it"
            )
        from shieldml.runner import open_output_key

        when = parse_time(at)
        k, bind, _ = open_output_key(
            src,
            recipient_key,
            receipt=receipt_file,
            policy=load_policy(policy_file),
            trust=receipt_trust(trust_root, insecure_custom_root, simulated_platform, when),
            now=when,
            bind=bind,
        )
    else:
        if receipt_file or policy_file:
            raise click.UsageError("--receipt and --policy go with --recipient-key")
        k = load_key(key_path or "")
    if STDIO in (src, dst):
        if workers is not None and workers > 1:
            raise click.UsageError("--workers needs IN and OUT to be files, not -")
        _decrypt_stdio(src, dst, k, bind, force, as_json)
        return
    items = plan_decrypt(src, dst, bind)
    with progress_bar(sum(i.size for i in items), "decrypting") as tick:
        decrypt_path(src, dst, k, overwrite=force, workers=workers, progress=tick, planned=items)
    _report(as_json, "decrypted", items, None)


@click.command()
@click.argument("path", metavar="IN", type=click.Path(exists=True))
@click.option(
    "--key",
    "key_path",
    required=True,
    type=EXISTING_FILE,
    help="Current key.",
)
@click.option(
    "--new-key",
    "new_key_path",
    required=True,
    type=EXISTING_FILE,
    help="New key (same format).",
)
@click.option("--bind", help="Path the files are bound to. Default: IN as given.")
@JSON_OPTION
def rekey(path: str, key_path: str, new_key_path: str, bind: str | None, as_json: bool) -> None:
    """Re-encrypt IN (a file or a directory) in place under a new key; each file atomically."""
    old = load_key(key_path)
    new = load_key(new_key_path)
    if len(old) != len(new):
        raise ShieldError("the new key must be of the same format (size) as the current one")
    items = plan_decrypt(path, path, bind)
    with progress_bar(sum(i.size for i in items), "re-encrypting") as tick:
        rekey_path(path, old, new, bind=bind, progress=tick)
    _report(as_json, "re-encrypted", items, None)


@click.command()
@click.argument("src", metavar="IN", type=click.Path(exists=True))
@click.argument("dst", metavar="OUT", type=click.Path(), required=False)
@click.option("--key", "key_path", required=True, type=EXISTING_FILE, help="Current key.")
@click.option(
    "--to",
    "to",
    required=True,
    help="The new bound path: the path the program opens inside the TEE (for a directory: the "
    "directory's path).",
)
@click.option("--bind", help="The path IN is bound to now. Default: IN as given.")
@click.option(
    "--new-key",
    "new_key_path",
    type=EXISTING_FILE,
    help="Re-encrypt under this key (same format). Default: the current key.",
)
@click.option("--force", is_flag=True, help="Replace existing output files.")
@JSON_OPTION
def rebind(
    src: str,
    dst: str | None,
    key_path: str,
    to: str,
    bind: str | None,
    new_key_path: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Re-encrypt IN (a file or a directory) for another bound path, into OUT (default: in place).

    For files that were encrypted for one path (Gramine's pf-crypt stores its output path as
    given) and must open at another. Same format and Gramine version; all or nothing: nothing
    is written, and in place nothing changes, unless every file verified.
    """
    if not to.strip("/") or "\0" in to:
        raise click.BadParameter("must be a non-empty path", param_hint="--to")
    old = load_key(key_path)
    new = load_key(new_key_path) if new_key_path else None
    if new is not None and len(new) != len(old):
        raise ShieldError("the new key must be of the same format (size) as the current one")
    total = sum(i.size for i in plan_decrypt(src, dst or src, bind))
    with progress_bar(total, "re-encrypting") as tick:
        items = rebind_path(
            src, dst or src, old, to=to, bind=bind, new_key=new, overwrite=force, progress=tick
        )
    _report(as_json, "rebound", items, None)


def _report(
    as_json: bool, verb: str, items: list[Planned], fmt: str | None, *, to_stderr: bool = False
) -> None:
    """What was done: on standard output, or on standard error when standard output carried
    the data (OUT `-`), there as one JSON line with --json."""
    if as_json:
        rows = [{"in": i.src, "out": i.dst, "bound_path": i.bind} for i in items]
        doc = {"action": verb, "format": fmt, "files": rows}
        if to_stderr:
            emit_json_line(dict(sorted(doc.items())))
        else:
            emit_json(doc, sort_keys=True)
        return
    console = err if to_stderr else out
    for i in items:
        console.print(
            f"{verb} {escape(i.src)} -> {escape(i.dst)}  "
            f"[dim](bound to {escape(repr(i.bind))})[/dim]"
        )
    if len(items) != 1:
        console.print(f"{verb} {len(items)} files")


#: IN or OUT that names standard input or output
STDIO = "-"


class _StdoutSink:
    """Standard output as a sink: every write complete, counted, flushed at once (so that what
    an error message calls written was written)."""

    def __init__(self) -> None:
        self._raw = sys.stdout.buffer
        self.written = 0

    def write(self, data: Any) -> int:
        self._raw.write(data)  # buffered: all of it, or an OSError
        self._raw.flush()
        n = memoryview(data).nbytes
        self.written += n
        return n

    def seek(self, _offset: int, _whence: int = 0) -> int:
        raise OSError(errno.ESPIPE, "standard output is not seekable")

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        self._raw.flush()


def _stdout_sink(binary: bool) -> _StdoutSink:
    if binary and sys.stdout.isatty():
        raise ShieldError(
            "refusing to write ciphertext to a terminal", hint="redirect standard output: > FILE"
        )
    return _StdoutSink()


def _need_bind(bind: str | None, why: str) -> str:
    if bind is None:
        raise click.UsageError(
            f"--bind is needed with {why}: it names the path the file is bound to"
        )
    return bind


def _encrypt_stdio(
    src: str,
    dst: str,
    key: bytes,
    fmt: Format,
    bind: str | None,
    gramine_version: int,
    force: bool,
    as_json: bool,
) -> None:
    if dst == STDIO:
        if src != STDIO and Path(src).is_dir():
            raise click.UsageError(f"{src} is a directory: only one file goes to standard output")
        bound = _need_bind(bind, "OUT -")
        if fmt is Format.GRAMINE_PF:
            raise ShieldError(
                "gramine-pf cannot be written to standard output: its metadata node at offset 0"
                " is written last, after the whole tree, so the output must be seekable",
                hint="give OUT as a file path, or use --format stream",
            )
        sink = _stdout_sink(binary=True)
        if src == STDIO:
            encrypt_stream(sys.stdin.buffer, sink, key, bind=bound, fmt=fmt, name="<stdin>")
        else:
            try:
                f = Path(src).open("rb")  # noqa: SIM115 - closed below
            except OSError as e:
                raise InputReadError(f"{src}: cannot read: {e.strerror}") from e
            with f, progress_bar(os.fstat(f.fileno()).st_size, "encrypting") as tick:
                encrypt_stream(f, sink, key, bind=bound, fmt=fmt, name=src, progress=tick)
    else:
        bound = dst if bind is None else bind
        with atomic_output(dst, overwrite=force) as target:
            encrypt_stream(
                sys.stdin.buffer,
                target,
                key,
                bind=bound,
                fmt=fmt,
                gramine_version=gramine_version,
                name="<stdin>",
            )
    name_in = "<stdin>" if src == STDIO else src
    name_out = "<stdout>" if dst == STDIO else dst
    _report(
        as_json,
        "encrypted",
        [Planned(name_in, name_out, bound, 0)],
        fmt.value,
        to_stderr=dst == STDIO,
    )


def _decrypt_stdio(
    src: str, dst: str, key: bytes, bind: str | None, force: bool, as_json: bool
) -> None:
    stdin = sys.stdin.buffer
    bound = _need_bind(bind, "IN -") if src == STDIO else (src if bind is None else bind)
    if dst != STDIO:  # from standard input into a file: all of it verifies, or nothing appears
        with atomic_output(dst, overwrite=force) as target:
            decrypt_stream(stdin, target, key, bind=bound, name="<stdin>")
    else:
        sink = _stdout_sink(binary=False)
        try:
            if src == STDIO:
                decrypt_stream(stdin, sink, key, bind=bound, name="<stdin>")
            else:
                _copy_out(src, key, bound, sink)
        except IntegrityError as e:
            if sink.written:
                e.hint = (
                    f"the {sink.written} bytes already written to standard output authenticated"
                    " but are only a prefix of the plaintext: discard them"
                )
            raise
    _report(
        as_json,
        "decrypted",
        [
            Planned(
                "<stdin>" if src == STDIO else src, "<stdout>" if dst == STDIO else dst, bound, 0
            )
        ],
        None,
        to_stderr=dst == STDIO,
    )


def _copy_out(src: str, key: bytes, bind: str, sink: _StdoutSink) -> None:
    """A protected file of either format to standard output, each part once authenticated."""
    with (
        open_protected(src, key, bind=bind) as reader,
        progress_bar(reader.size, "decrypting") as tick,
    ):
        buf = bytearray(1 << 20)
        with memoryview(buf) as view:
            while n := reader.readinto(view):
                with view[:n] as part:
                    sink.write(part)
                tick(n)


@click.command()
@click.argument("path", metavar="FILE", type=EXISTING_FILE)
@click.option(
    "--key", "key_path", type=click.Path(dir_okay=False), help="Key (gramine-pf: exact size, path)."
)
@JSON_OPTION
def inspect(path: str, key_path: str | None, as_json: bool) -> None:
    """Show the format, version and plaintext size of a protected file."""
    k = load_key(key_path) if key_path else None  # the file's format decides the size
    data = inspect_file(path, k).to_dict()
    if as_json:
        emit_json(data, sort_keys=True)
        return
    for name, value in data.items():
        if name == "plaintext_size_range":
            value = f"{value[0]}..{value[1]} (exact size needs --key)"
        out.print(f"{name:>22}: {escape(str(value))}")


COMMANDS = (key, encrypt, decrypt, rekey, rebind, inspect)
