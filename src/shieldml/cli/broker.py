"""``shieldml broker ...`` and ``shieldml audit ...``: run the key broker and administer it."""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape

from shieldml.cli._common import (
    EXISTING_FILE,
    FORMAT_CHOICE,
    JSON_OPTION,
    F,
    read_policy,
    trust_root_options,
)
from shieldml.cli._output import emit, emit_json, out
from shieldml.errors import ShieldError
from shieldml.files import Format, load_key

if TYPE_CHECKING:
    from shieldml.broker.client import BrokerClient

DEFAULT_URL = "https://127.0.0.1:8443"


@contextmanager
def _broker_extra() -> Iterator[None]:
    """Around the imports of the broker's server stack: without the ``[broker]`` extra, a
    :class:`ShieldError` that names it (one error line, exit 1) instead of a traceback."""
    try:
        yield
    except ImportError as e:
        if e.name is None:  # shieldml.broker.server's own message names the extra
            raise ShieldError(str(e)) from e
        raise ShieldError(
            f"the key broker needs the [broker] extra ({e.name} is missing): "
            "pip install 'shieldml[broker]'"
        ) from e


def _state(state: str | None) -> Path:
    if state:
        return Path(state)
    home = os.environ.get("SHIELDML_HOME")
    return (Path(home) if home else Path.home() / ".shieldml") / "broker"


def _database(database: str | None, state_dir: Path) -> str:
    return database or f"sqlite:///{state_dir / 'broker.db'}"


def _client(url: str, fingerprint: str | None, token_file: str | None) -> BrokerClient:
    from shieldml.broker.client import BrokerClient

    token = os.environ.get("SHIELDML_BROKER_TOKEN")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise ShieldError(f"{token_file}: cannot read the admin token: {e.strerror}") from e
    if not token:
        raise ShieldError(
            "admin operations need the broker's token",
            hint="--token-file FILE or SHIELDML_BROKER_TOKEN",
        )
    if url.startswith("https://") and not fingerprint:
        raise ShieldError(
            "pin the broker's TLS certificate with --fingerprint (printed by `shieldml broker serve`)"
        )
    return BrokerClient(url, fingerprint=fingerprint, token=token)


def _conn(f: F) -> F:
    """``--url``, ``--fingerprint`` and ``--token-file``: how to reach a broker as its admin."""
    f = click.option(
        "--token-file",
        type=click.Path(dir_okay=False),
        help="Admin token (or SHIELDML_BROKER_TOKEN).",
    )(f)
    f = click.option(
        "--fingerprint",
        envvar="SHIELDML_BROKER_FINGERPRINT",
        help="SHA-256 of the broker's TLS certificate.",
    )(f)
    return click.option(
        "--url", envvar="SHIELDML_BROKER_URL", default=DEFAULT_URL, show_default=True
    )(f)


def _timeout_option(name: str, what: str) -> Callable[[F], F]:
    return click.option(
        name,
        type=click.FloatRange(min=0.1),
        default=10.0,
        show_default=True,
        help=f"Seconds a client has to send {what} (slower ones get 408).",
    )


@click.group()
def broker() -> None:
    """The key broker: holds keys, releases them to attested TEEs under owner policies."""


@broker.command()
@click.option(
    "--database",
    help="SQLAlchemy URL (default: SQLite in the state directory); postgresql+psycopg://… for replicas.",
)
@click.option(
    "--state",
    type=click.Path(file_okay=False),
    help="State directory (KEK, TLS key); default ~/.shieldml/broker.",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8443, show_default=True)
@click.option("--tls-cert", type=EXISTING_FILE)
@click.option("--tls-key", type=EXISTING_FILE)
@click.option("--insecure-no-tls", is_flag=True, help="Plain HTTP (tests only; logged).")
@trust_root_options
@click.option(
    "--simulated-platform",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Trust this simulated platform's roots (tests, demo).",
)
@click.option(
    "--admin-token-file",
    type=click.Path(dir_okay=False),
    help="On first start, also write the admin token here (mode 0600).",
)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option(
    "--nonce-ttl",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds a challenge stays valid.",
)
@_timeout_option("--body-timeout", "a request body")
@_timeout_option(
    "--header-timeout",
    "a request line and headers, from connecting or from the first byte of a kept-alive request",
)
@click.option(
    "--pccs", "pccs_url", help="PCCS or Intel PCS URL for collateral runners do not send."
)
@click.option("--secret-prov-port", type=int, help="Also serve Gramine's secret provisioning here.")
@click.option("--secret-prov-key", help="The gramine-pf key released over secret provisioning.")
def serve(
    database: str | None,
    state: str | None,
    host: str,
    port: int,
    tls_cert: str | None,
    tls_key: str | None,
    insecure_no_tls: bool,
    trust_root: tuple[str, ...],
    insecure_custom_root: bool,
    simulated_platform: tuple[str, ...],
    admin_token_file: str | None,
    workers: int,
    nonce_ttl: float,
    body_timeout: float,
    header_timeout: float,
    pccs_url: str | None,
    secret_prov_port: int | None,
    secret_prov_key: str | None,
) -> None:
    """Run the broker (HTTPS by default, with a self-signed certificate made on first start)."""
    with _broker_extra():
        import uvicorn

        from shieldml.broker.server import BrokerConfig, Store, self_signed
        from shieldml.broker.server.http import HeaderTimeoutProtocol

    state_dir = _state(state)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    url = _database(database, state_dir)
    if (secret_prov_port is None) != (secret_prov_key is None):
        raise ShieldError("--secret-prov-port and --secret-prov-key go together")
    cfg = BrokerConfig(
        database=url,
        state_dir=str(state_dir),
        trust_roots=trust_root,
        insecure_custom_root=insecure_custom_root,
        simulated_platforms=simulated_platform,
        nonce_ttl_s=nonce_ttl,
        pccs_url=pccs_url,
        secret_prov_port=secret_prov_port,
        secret_prov_key=secret_prov_key,
        body_timeout_s=body_timeout,
        header_timeout_s=header_timeout,
    )
    cfg.trust()  # fail early on bad roots
    store = Store(url, state_dir)
    token = store.init_admin_token()
    store.engine.dispose()
    if token:
        out.print(f"admin token (shown once, stored only as a hash): [bold]{token}[/bold]")
        if admin_token_file:
            fd = os.open(admin_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
    ssl_kw: dict[str, Any] = {}
    scheme = "http"
    if not insecure_no_tls:
        if bool(tls_cert) != bool(tls_key):
            raise ShieldError("--tls-cert and --tls-key go together")
        if tls_cert and tls_key:
            cert, key = Path(tls_cert), Path(tls_key)
        else:
            made = self_signed(state_dir, [host])
            cert, key = made.cert, made.key
        from shieldml.broker.tls import cert_fingerprint

        out.print(
            f"TLS certificate fingerprint (clients pin it): [bold]{cert_fingerprint(cert.read_bytes())}[/bold]"
        )
        ssl_kw = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        scheme = "https"
        if secret_prov_port is not None and secret_prov_key is not None:
            with _broker_extra():
                from shieldml.broker.server.secret_prov import SecretProvServer

            sp = SecretProvServer(
                store=Store(url, state_dir),
                settings=cfg.settings(),
                key_name=secret_prov_key,
                cert_file=str(cert),
                key_file=str(key),
                collateral_for=cfg.collateral_source(),
                host=host,
                port=secret_prov_port,
            )
            sp.start()
            out.print(
                f"Gramine secret provisioning on {host}:{sp.port} (key {escape(secret_prov_key)})"
            )
    else:
        if secret_prov_port is not None:
            raise ShieldError("Gramine secret provisioning needs TLS")
        out.print("[yellow]insecure: serving plain HTTP[/yellow]")
    out.print(
        f"broker listening on {scheme}://{host}:{port}  (database: {escape(url.split('@')[-1])})"
    )
    sys.stdout.flush()
    os.environ["SHIELDML_BROKER_CONFIG"] = cfg.to_env()
    uvicorn.run(
        "shieldml.broker.server:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        http=HeaderTimeoutProtocol,
        log_level="warning",
        access_log=False,
        **ssl_kw,
    )


@broker.command("rotate-kek")
@click.option("--database")
@click.option("--state", type=click.Path(file_okay=False))
def rotate_kek(database: str | None, state: str | None) -> None:
    """Re-wrap every stored key under a new key-encryption key (data is not re-encrypted)."""
    with _broker_extra():
        from shieldml.broker.server import Store

    state_dir = _state(state)
    store = Store(_database(database, state_dir), state_dir)
    n = store.rotate_kek()
    store.audit("kek_rotated", {"keys": n, "kek_id": store.kek.id})
    out.print(f"re-wrapped {n} key(s) under KEK {store.kek.id}")


@broker.command("log-key")
@click.option("--state", type=click.Path(file_okay=False))
def log_key(state: str | None) -> None:
    """Print the audit log's verifier key (signed-note format; made on first start if absent).

    Give it to whoever checks checkpoints: `shieldml audit verify --log-key`, `shieldml receipt
    verify --log-key`. It is the public half of the key file `log-signing-key` in the state
    directory, which stays outside the database."""
    from shieldml.broker.tlog import NoteSigner

    state_dir = _state(state)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    click.echo(NoteSigner.load_or_create(state_dir / "log-signing-key").verifier.vkey())


@broker.group("key")
def key_group() -> None:
    """Keys held by the broker."""


@key_group.command("add")
@click.argument("name")
@_conn
@click.option("--format", "fmt", type=FORMAT_CHOICE, default="stream", show_default=True)
@click.option(
    "--key",
    "key_file",
    type=EXISTING_FILE,
    help="Raw key file; generated by the broker when absent.",
)
@click.option("--replace", is_flag=True)
def key_add(
    name: str,
    url: str,
    fingerprint: str | None,
    token_file: str | None,
    fmt: str,
    key_file: str | None,
    replace: bool,
) -> None:
    """Add (or generate) the key NAME."""
    key = load_key(key_file, Format(fmt)) if key_file else None
    with _client(url, fingerprint, token_file) as c:
        doc = c.add_key(name, fmt, key, replace=replace)
    out.print(f"key {escape(name)} ({fmt}) stored; audit record {doc['audit_seq']}")


@key_group.command("list")
@_conn
@JSON_OPTION
def key_list(url: str, fingerprint: str | None, token_file: str | None, as_json: bool) -> None:
    """List the keys (never their values)."""
    with _client(url, fingerprint, token_file) as c:
        rows = c.list_keys()
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        out.print(
            f"{escape(r['name'])}  {r['format']}  policy: {'yes' if r['has_policy'] else '[red]none (denied)[/red]'}"
        )


@broker.group("policy")
def policy_group() -> None:
    """Release policies on the broker."""


@policy_group.command("set")
@click.argument("name")
@click.argument("policy_file", metavar="POLICY", type=EXISTING_FILE)
@_conn
def policy_set(
    name: str, policy_file: str, url: str, fingerprint: str | None, token_file: str | None
) -> None:
    """Set the release policy of key NAME from a TOML file (validated first)."""
    text, _ = read_policy(policy_file)
    with _client(url, fingerprint, token_file) as c:
        doc = c.set_policy(name, text)
    out.print(
        f"policy of {escape(name)}: {doc['profiles']} profile(s); audit record {doc['audit_seq']}"
    )


@click.group()
def audit() -> None:
    """The broker's append-only audit log: a hash chain and a Merkle tree with signed checkpoints."""


@audit.command("show")
@_conn
@click.option("--after", type=int, default=0)
@JSON_OPTION
def audit_show(
    url: str, fingerprint: str | None, token_file: str | None, after: int, as_json: bool
) -> None:
    """Print audit records."""
    with _client(url, fingerprint, token_file) as c:
        records, head = c.audit_all()
    records = [r for r in records if r["seq"] > after]
    if as_json:
        emit_json({"head": head, "records": records})
        return
    for r in records:
        allowed = r["data"].get("allowed")
        mark = (
            ""
            if allowed is None
            else ("[green]allowed[/green] " if allowed else "[red]denied[/red] ")
        )
        reason = r["data"].get("reason", "")
        out.print(f"{r['seq']:>6} {r['at']} {r['event']:<12} {mark}{escape(str(reason))}")


def _log_key_option(f: F) -> F:
    return click.option(
        "--log-key",
        "log_key",
        help="The log's verifier key (`shieldml broker log-key`), or a file holding it: pins who "
        "must have signed the checkpoints (default: the key the broker names, which only shows "
        "the log agrees with itself).",
    )(f)


def _verifier(log_key: str | None, reported: str | None) -> tuple[Any, bool]:
    """The verifier key to check checkpoints with, and whether it was pinned by the caller."""
    from shieldml.broker.tlog import NoteVerifier

    if log_key:
        text = log_key
        if not log_key.count("+") >= 2 or Path(log_key).exists():
            try:
                text = Path(log_key).read_text().strip()
            except OSError as e:
                raise ShieldError(f"{log_key}: cannot read the log key: {e.strerror}") from e
        return NoteVerifier.parse(text), True
    if reported is None:
        raise ShieldError("no log verifier key: give --log-key")
    return NoteVerifier.parse(reported), False


@audit.command("checkpoint")
@click.option("--url", envvar="SHIELDML_BROKER_URL", default=DEFAULT_URL, show_default=True)
@click.option(
    "--fingerprint",
    envvar="SHIELDML_BROKER_FINGERPRINT",
    help="SHA-256 of the broker's TLS certificate.",
)
@_log_key_option
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False), help="Save the signed checkpoint here."
)
@JSON_OPTION
def audit_checkpoint(
    url: str, fingerprint: str | None, log_key: str | None, output: str | None, as_json: bool
) -> None:
    """Print (or save) the log's latest signed checkpoint: publish it anywhere; any later
    `audit verify --checkpoint FILE` shows whether the log still extends it. No admin token."""
    from shieldml.broker.audit import write_atomic
    from shieldml.broker.client import BrokerClient
    from shieldml.broker.tlog import open_checkpoint

    if url.startswith("https://") and not fingerprint:
        raise ShieldError("pin the broker's TLS certificate with --fingerprint")
    with BrokerClient(url, fingerprint=fingerprint) as c:
        doc = c.audit_checkpoint()
    verifier, pinned = _verifier(log_key, doc["verifier_key"])
    cp = open_checkpoint(doc["checkpoint"], [verifier])
    if output:
        write_atomic(Path(output), doc["checkpoint"])
    if as_json:
        emit_json(
            {
                "checkpoint": doc["checkpoint"],
                "verifier_key": verifier.vkey(),
                "key_pinned": pinned,
                "origin": cp.origin,
                "size": cp.size,
                "root": base64.b64encode(cp.root).decode(),
            }
        )
    elif output:
        out.print(
            f"checkpoint of {escape(cp.origin)}: {cp.size} records, saved to {escape(output)}"
        )
    else:
        click.echo(doc["checkpoint"], nl=False)


@audit.command("verify")
@_conn
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    help="A signed checkpoint saved earlier (`audit checkpoint -o`, a receipt's, one published): "
    "the log must still extend it (detects removed or rewritten records). Replaced by the "
    "latest checkpoint once verified; created when absent.",
)
@_log_key_option
@JSON_OPTION
@click.pass_context
def audit_verify(
    ctx: click.Context,
    /,
    url: str,
    fingerprint: str | None,
    token_file: str | None,
    checkpoint: str | None,
    log_key: str | None,
    as_json: bool,
) -> None:
    """Check the whole log against the latest signed checkpoint (and a saved one). Exit 1 if broken.

    Every record chained and hashed, the first N records hashing to the root the broker signed
    for N, and a saved checkpoint a prefix of the latest (RFC 9162 consistency proof from the
    broker, and recomputed from the records)."""
    from shieldml.broker.audit import (
        AuditRecord,
        ChainHead,
        verify_chain,
        verify_tree,
        write_atomic,
    )
    from shieldml.broker.tlog import Checkpoint, split_note
    from shieldml.errors import AuditChainError, BrokerError, FormatError

    path = Path(checkpoint) if checkpoint else None
    saved = path.read_text() if path is not None and path.exists() else None
    legacy: ChainHead | None = None
    if saved is not None and saved.lstrip().startswith("{"):  # a head file of earlier versions
        try:
            legacy = ChainHead.from_dict(json.loads(saved))
        except ValueError as e:
            raise FormatError(f"{checkpoint}: not an audit checkpoint: {e}") from None
        saved = None
    with _client(url, fingerprint, token_file) as c:
        try:
            doc = c.audit_checkpoint()  # first: the records fetched next cover it
        except BrokerError as e:  # it refuses to sign a tree state its key did not write
            if e.status is None or e.status >= 500:
                raise
            reason = f"the broker signs no checkpoint: {e.message}"
            emit(
                {"ok": False, "reason": reason},
                as_json,
                "[bold red]broken:[/bold red] " + escape(reason),
            )
            ctx.exit(1)
        raw, head = c.audit_all()
        proof: list[bytes] | None = None
        if saved is not None:
            old = Checkpoint.parse(split_note(saved)[0])
            latest = Checkpoint.parse(split_note(doc["checkpoint"])[0])
            if old.size <= latest.size:
                proof = c.audit_consistency(old.size, latest.size)
    verifier, pinned = _verifier(log_key, doc["verifier_key"])
    head_out: dict[str, Any] = dict(head)
    try:
        recs = [AuditRecord.from_dict(r) for r in raw]
        verify_chain(recs, ChainHead.from_dict(head))
        if legacy is not None:
            verify_chain(recs, legacy)
        tree = verify_tree(recs, doc["checkpoint"], [verifier], saved=saved, consistency=proof)
    except AuditChainError as e:
        ok, reason = False, e.message
    else:
        ok = True
        cp = tree.checkpoint
        reason = (
            f"{tree.records} records, chain intact; records 1 to {cp.size} are the tree "
            f"{cp.origin} signed"
            + ("" if pinned else " (key as the broker names it: pin it with --log-key)")
        )
        if tree.saved is not None:
            reason += f"; it extends the saved checkpoint of {tree.saved.size}"
        if path is not None:
            write_atomic(path, doc["checkpoint"])
            reason += f"; checkpoint {checkpoint} updated"
        head_out["tree_size"] = cp.size
        head_out["root"] = base64.b64encode(cp.root).decode()
    emit(
        {"ok": ok, "reason": reason, "head": head_out, "checkpoint": doc["checkpoint"]},
        as_json,
        ("[green]ok[/green] " if ok else "[bold red]broken:[/bold red] ") + escape(reason),
    )
    if not ok:
        ctx.exit(1)


COMMANDS = (broker, audit)
