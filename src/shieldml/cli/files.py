"""``shieldml key new|recipient``, ``encrypt``, ``decrypt``, ``rekey``, ``inspect``: protected
files and their keys."""

from __future__ import annotations

import click
from rich.markup import escape

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
from shieldml.cli._output import emit, emit_json, out, progress_bar
from shieldml.errors import ShieldError
from shieldml.files import (
    Format,
    Planned,
    decrypt_path,
    encrypt_path,
    generate_key,
    inspect_file,
    load_key,
    plan_decrypt,
    plan_encrypt,
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
@click.argument("src", metavar="IN", type=click.Path(exists=True))
@click.argument("dst", metavar="OUT", type=click.Path())
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
    """Encrypt IN (a file or a directory, recursively) into OUT."""
    f = Format(fmt)
    k = load_key(key_path, f)
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
@click.argument("src", metavar="IN", type=click.Path(exists=True))
@click.argument("dst", metavar="OUT", type=click.Path())
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
    """
    if (key_path is None) == (recipient_key is None):
        raise click.UsageError("give exactly one of --key and --recipient-key")
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


def _report(as_json: bool, verb: str, items: list[Planned], fmt: str | None) -> None:
    if as_json:
        rows = [{"in": i.src, "out": i.dst, "bound_path": i.bind} for i in items]
        emit_json({"action": verb, "format": fmt, "files": rows}, sort_keys=True)
        return
    for i in items:
        out.print(
            f"{verb} {escape(i.src)} -> {escape(i.dst)}  "
            f"[dim](bound to {escape(repr(i.bind))})[/dim]"
        )
    if len(items) != 1:
        out.print(f"{verb} {len(items)} files")


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


COMMANDS = (key, encrypt, decrypt, rekey, inspect)
