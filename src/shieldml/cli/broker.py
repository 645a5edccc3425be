"""``shieldml broker ...`` and ``shieldml audit ...``: run the key broker and administer it."""

from __future__ import annotations

import base64
import errno
import json
import os
import secrets
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape

from shieldml.broker.protocol import CHALLENGE_BURST, CHALLENGE_RATE
from shieldml.cli._common import (
    EXISTING_FILE,
    FORMAT_CHOICE,
    JSON_OPTION,
    F,
    read_policy,
    trust_root_options,
)
from shieldml.cli._output import emit, emit_json, err, out
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
        show_envvar=True,
        help="SHA-256 of the broker's TLS certificate (`shieldml broker fingerprint`).",
    )(f)
    return click.option(
        "--url",
        envvar="SHIELDML_BROKER_URL",
        show_envvar=True,
        default=DEFAULT_URL,
        show_default=True,
        help="The broker.",
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
    help="Trust this simulated platform's roots, its CPUs' and its GPUs' (tests, demo).",
)
@click.option(
    "--admin-token-file",
    type=click.Path(dir_okay=False),
    help="On first start, write the admin token here (mode 0600; default STATE/admin-token). "
    "An existing file that others can read is refused.",
)
@click.option(
    "--print-admin-token",
    is_flag=True,
    help="On first start, also print the admin token to stdout (it is never printed otherwise).",
)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option(
    "--nonce-ttl",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds a challenge stays valid.",
)
@click.option(
    "--challenge-rate",
    type=click.FloatRange(min=0),
    default=CHALLENGE_RATE,
    show_default=True,
    help="Challenges a second per client address and worker (beyond them and the burst: 429; "
    "0 turns the limit off).",
)
@click.option(
    "--challenge-burst",
    type=click.FloatRange(min=1),
    default=CHALLENGE_BURST,
    show_default=True,
    help="Challenges a client address may ask for at once before the rate applies.",
)
@_timeout_option("--body-timeout", "a request body")
@_timeout_option(
    "--header-timeout",
    "a request line and headers, from connecting or from the first byte of a kept-alive request",
)
@click.option(
    "--pccs", "pccs_url", help="PCCS or Intel PCS URL for collateral runners do not send."
)
@click.option(
    "--amd-kds",
    "amd_kds_url",
    metavar="URL",
    help="AMD's key distribution service (https://kdsintf.amd.com) for the CRL of SEV-SNP "
    "evidence runners send without one; cached in the state directory while current. Without "
    "it (or a cached CRL) such evidence is unchecked, which policies refuse unless they set "
    "insecure_allow_unchecked_revocation.",
)
@click.option("--secret-prov-port", type=int, help="Also serve Gramine's secret provisioning here.")
@click.option("--secret-prov-key", help="The gramine-pf key released over secret provisioning.")
@JSON_OPTION
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
    print_admin_token: bool,
    workers: int,
    nonce_ttl: float,
    challenge_rate: float,
    challenge_burst: float,
    body_timeout: float,
    header_timeout: float,
    pccs_url: str | None,
    amd_kds_url: str | None,
    secret_prov_port: int | None,
    secret_prov_key: str | None,
    as_json: bool,
) -> None:
    """Run the broker (HTTPS by default, with a self-signed certificate made on first start).

    With --json, once the socket listens: one JSON line on stdout, ``{"event": "listening",
    "url", "host", "port", "fingerprint", "state", "database", "admin_token_file",
    "secret_prov_port"}`` (``admin_token_file``: where a token made on this start was written,
    else null; ``admin_token`` too with --print-admin-token); warnings go to stderr.
    """
    said = err if as_json else out  # stdout carries only the JSON line then
    started: dict[str, Any] = {"admin_token_file": None}
    with _broker_extra():
        import uvicorn

        from shieldml.broker.server import BrokerConfig, Store, self_signed
        from shieldml.broker.server.http import HeaderTimeoutProtocol

    if (secret_prov_port is None) != (secret_prov_key is None):
        raise ShieldError("--secret-prov-port and --secret-prov-key go together")
    # The port first: in use, or not ours to bind, means exit 1 before any state exists.
    sock = _listen(host, port)
    port = sock.getsockname()[1]
    state_dir = _state(state)
    token_path = Path(admin_token_file) if admin_token_file else state_dir / "admin-token"
    _check_token_file(token_path)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    url = _database(database, state_dir)
    cfg = BrokerConfig(
        database=url,
        state_dir=str(state_dir),
        trust_roots=trust_root,
        insecure_custom_root=insecure_custom_root,
        simulated_platforms=simulated_platform,
        nonce_ttl_s=nonce_ttl,
        pccs_url=pccs_url,
        amd_kds_url=amd_kds_url,
        secret_prov_port=secret_prov_port,
        secret_prov_key=secret_prov_key,
        body_timeout_s=body_timeout,
        header_timeout_s=header_timeout,
        challenge_rate=challenge_rate,
        challenge_burst=challenge_burst,
    )
    cfg.trust(announce=False)  # fail early on bad roots (the serving process says insecure)
    store = Store(url, state_dir)
    if not store.has_admin_token():
        # The broker stores only the token's hash; the token itself goes to a 0600 file written
        # before the hash is stored and renamed into place after (a full disk leaves no token
        # nobody has; of two replicas starting at once, the one whose hash was stored wins).
        token = secrets.token_urlsafe(32)
        tmp = _new_token_file(token_path, token)
        try:
            won = store.init_admin_token(token) is not None
        except BaseException:
            tmp.unlink()
            raise
        if not won:
            tmp.unlink()
        else:
            try:
                _check_token_file(token_path)  # nothing was put there meanwhile
                tmp.replace(token_path)
            except (ShieldError, OSError) as e:
                raise ShieldError(
                    f"the admin token is in {tmp}; it could not be moved to {token_path}: {e}"
                ) from e
        if won and as_json:
            started["admin_token_file"] = str(token_path)
            if print_admin_token:
                started["admin_token"] = token
        elif won:
            out.print(f"admin token written to {escape(str(token_path))} (mode 0600)")
            if print_admin_token:
                out.print(f"admin token: {token}", markup=False, highlight=False)
    store.engine.dispose()
    ssl_kw: dict[str, Any] = {}
    scheme = "http"
    fingerprint: str | None = None
    sp_port: int | None = None
    if not insecure_no_tls:
        if bool(tls_cert) != bool(tls_key):
            raise ShieldError("--tls-cert and --tls-key go together")
        if tls_cert and tls_key:
            cert, key = Path(tls_cert), Path(tls_key)
        else:
            made = self_signed(state_dir, [host])
            cert, key = made.cert, made.key
        from shieldml.broker.tls import cert_fingerprint

        fingerprint = cert_fingerprint(cert.read_bytes())
        if not as_json:
            out.print(f"TLS certificate fingerprint (clients pin it): [bold]{fingerprint}[/bold]")
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
            sp_port = sp.port
            if not as_json:
                out.print(
                    f"Gramine secret provisioning on {host}:{sp.port} (key"
                    f" {escape(secret_prov_key)})"
                )
    else:
        if secret_prov_port is not None:
            raise ShieldError("Gramine secret provisioning needs TLS")
        said.print("[yellow]insecure: serving plain HTTP[/yellow]")
    shown_db = url.split("@")[-1]  # never the password of a database URL
    if as_json:
        doc = {
            "event": "listening",
            "url": f"{scheme}://{host}:{port}",
            "host": host,
            "port": port,
            "fingerprint": fingerprint,
            "state": str(state_dir),
            "database": shown_db,
            "secret_prov_port": sp_port,
        } | started
        click.echo(json.dumps(doc))
    else:
        out.print(f"broker listening on {scheme}://{host}:{port}  (database: {escape(shown_db)})")
    sys.stdout.flush()
    os.environ["SHIELDML_BROKER_CONFIG"] = cfg.to_env()
    # Served on the socket bound above (uvicorn's own ``fd=`` would re-wrap it as AF_UNIX and lose
    # the peer addresses the per-client challenge limit counts).
    config = uvicorn.Config(
        "shieldml.broker.server:app_from_env",
        factory=True,
        workers=workers,
        http=HeaderTimeoutProtocol,
        log_level="warning",
        access_log=False,
        **ssl_kw,
    )
    server = uvicorn.Server(config)
    try:
        if workers > 1:
            from uvicorn.supervisors import Multiprocess

            Multiprocess(config, sockets=[sock]).run()
        else:
            config.load_app()
            server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    if workers == 1 and not server.started:
        raise ShieldError("the broker did not start (see the log above)")


def _listen(host: str, port: int) -> socket.socket:
    """The broker's listening socket, bound now (uvicorn serves it by descriptor)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ShieldError(
            f"{host}:{port}: cannot listen: {e.strerror}",
            hint="another process uses this port? choose one with --port"
            if e.errno == errno.EADDRINUSE
            else None,
        ) from e
    sock.set_inheritable(True)
    return sock


def _check_token_file(path: Path) -> None:
    """An existing admin-token file must be a regular file of ours that nobody else can read."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ShieldError(f"{path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ShieldError(
            f"{path}: refusing to write the admin token into a file others can read or that is "
            f"not ours (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}, "
            f"{'regular file' if stat.S_ISREG(st.st_mode) else 'not a regular file'})",
            hint=f"remove it, or make it yours with mode 0600: chmod 600 {path}",
        )


def _new_token_file(path: Path, token: str) -> Path:
    """Write the token to a new 0600 file beside ``path`` (renamed into place once its hash is
    stored: a token nobody could read is never the broker's token)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise ShieldError(f"{path}: cannot write the admin token: {e.strerror}") from e
    return tmp


@broker.command("fingerprint")
@click.option(
    "--state",
    type=click.Path(file_okay=False),
    help="The broker's state directory (default ~/.shieldml/broker).",
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds to wait for STATE/tls-cert.pem (a broker just started in the background).",
)
@JSON_OPTION
def fingerprint_cmd(state: str | None, wait: float, as_json: bool) -> None:
    """Print the SHA-256 fingerprint of STATE/tls-cert.pem, the certificate clients pin."""
    import time

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from shieldml.broker.tls import cert_fingerprint

    path = _state(state) / "tls-cert.pem"
    deadline = time.monotonic() + wait
    while True:
        try:  # written once, on first start, not atomically: retry an empty or partial file
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            fp = cert_fingerprint(cert.public_bytes(Encoding.DER))
            break
        except (OSError, ValueError) as e:
            if time.monotonic() >= deadline:
                why = e.strerror if isinstance(e, OSError) else "not a PEM certificate"
                raise ShieldError(
                    f"{path}: {why}",
                    hint="the broker writes it on first start (`shieldml broker serve --state "
                    "DIR`); --wait SECONDS waits for it",
                ) from e
            time.sleep(0.1)
    emit({"path": str(path), "fingerprint": fp}, as_json, fp)


@broker.command("rotate-kek")
@click.option("--database")
@click.option("--state", type=click.Path(file_okay=False))
@JSON_OPTION
def rotate_kek(database: str | None, state: str | None, as_json: bool) -> None:
    """Re-wrap every stored key under a new key-encryption key (data is not re-encrypted)."""
    with _broker_extra():
        from shieldml.broker.server import Store

    state_dir = _state(state)
    store = Store(_database(database, state_dir), state_dir)
    n = store.rotate_kek()
    store.audit("kek_rotated", {"keys": n, "kek_id": store.kek.id})
    emit(
        {"rewrapped": n, "kek_id": store.kek.id},
        as_json,
        f"re-wrapped {n} key(s) under KEK {escape(str(store.kek.id))}",
    )


@broker.command("rotate-admin-token")
@click.option("--database")
@click.option("--state", type=click.Path(file_okay=False))
@click.option(
    "--admin-token-file",
    type=click.Path(dir_okay=False),
    help="Where the new token goes (mode 0600; default STATE/admin-token).",
)
def rotate_admin_token(
    database: str | None, state: str | None, admin_token_file: str | None
) -> None:
    """Replace the admin token (run beside the broker's state; the old token stops working at
    once, on every replica). The new one is written to a 0600 file, never printed."""
    with _broker_extra():
        from shieldml.broker.server import Store

    state_dir = _state(state)
    if not (state_dir / "kek").exists():
        raise ShieldError(f"{state_dir}: not a broker state directory (no kek)")
    token_path = Path(admin_token_file) if admin_token_file else state_dir / "admin-token"
    _check_token_file(token_path)
    store = Store(_database(database, state_dir), state_dir)
    token = secrets.token_urlsafe(32)
    tmp = _new_token_file(token_path, token)
    try:
        store.rotate_admin_token(token)
    except BaseException:
        tmp.unlink()
        raise
    try:
        tmp.replace(token_path)
    except OSError as e:
        raise ShieldError(
            f"the new admin token is in {tmp}; it could not be moved to {token_path}: {e}"
        ) from e
    store.audit("admin_token_rotated", {})
    store.engine.dispose()
    out.print(f"new admin token written to {escape(str(token_path))} (mode 0600)")


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
@JSON_OPTION
def key_add(
    name: str,
    url: str,
    fingerprint: str | None,
    token_file: str | None,
    fmt: str,
    key_file: str | None,
    replace: bool,
    as_json: bool,
) -> None:
    """Add (or generate) the key NAME."""
    key = load_key(key_file, Format(fmt)) if key_file else None
    with _client(url, fingerprint, token_file) as c:
        doc = c.add_key(name, fmt, key, replace=replace)
    emit(
        {"key": name, "format": fmt, "audit_seq": doc["audit_seq"]},
        as_json,
        f"key {escape(name)} ({fmt}) stored; audit record {doc['audit_seq']}",
    )


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


@key_group.command("rm")
@click.argument("name")
@_conn
@JSON_OPTION
def key_rm(
    name: str, url: str, fingerprint: str | None, token_file: str | None, as_json: bool
) -> None:
    """Remove the key NAME and its policy (nothing can release it afterwards)."""
    with _client(url, fingerprint, token_file) as c:
        doc = c.delete_key(name)
    emit(doc, as_json, f"key {escape(name)} removed; audit record {doc['audit_seq']}")


@broker.group("policy")
def policy_group() -> None:
    """Release policies on the broker."""


@policy_group.command("get")
@click.argument("name")
@_conn
@JSON_OPTION
def policy_get(
    name: str, url: str, fingerprint: str | None, token_file: str | None, as_json: bool
) -> None:
    """Print the release policy of key NAME (the TOML as set; --json adds its SHA-256)."""
    with _client(url, fingerprint, token_file) as c:
        doc = c.get_policy(name)
    if as_json:
        emit_json(doc)
    else:
        click.echo(doc["toml"], nl=not doc["toml"].endswith("\n"))


@policy_group.command("list")
@_conn
@JSON_OPTION
def policy_list(url: str, fingerprint: str | None, token_file: str | None, as_json: bool) -> None:
    """List the keys that have a policy, with its SHA-256 and when it was set."""
    with _client(url, fingerprint, token_file) as c:
        rows = c.list_policies()
    if as_json:
        emit_json([{k: v for k, v in r.items() if k != "toml"} for r in rows])
        return
    for r in rows:
        out.print(f"{escape(r['name'])}  sha256:{r['sha256']}  set {r['updated_at']}")


@policy_group.command("rm")
@click.argument("name")
@_conn
@JSON_OPTION
def policy_rm(
    name: str, url: str, fingerprint: str | None, token_file: str | None, as_json: bool
) -> None:
    """Remove the policy of key NAME: its releases are denied until one is set again."""
    with _client(url, fingerprint, token_file) as c:
        doc = c.delete_policy(name)
    emit(doc, as_json, f"policy of {escape(name)} removed; audit record {doc['audit_seq']}")


@policy_group.command("set")
@click.argument("name")
@click.argument("policy_file", metavar="POLICY", type=EXISTING_FILE)
@_conn
@JSON_OPTION
def policy_set(
    name: str,
    policy_file: str,
    url: str,
    fingerprint: str | None,
    token_file: str | None,
    as_json: bool,
) -> None:
    """Set the release policy of key NAME from a TOML file (validated first)."""
    text, _ = read_policy(policy_file)
    with _client(url, fingerprint, token_file) as c:
        doc = c.set_policy(name, text)
    emit(
        {"key": name, "profiles": doc["profiles"], "audit_seq": doc["audit_seq"]},
        as_json,
        f"policy of {escape(name)}: {doc['profiles']} profile(s); audit record {doc['audit_seq']}",
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
    if not records:
        out.print(f"no audit records after {after}")
        return
    out.print(audit_table(records))


def _audit_key(data: dict[str, Any]) -> str:
    keys = data.get("keys", data.get("name"))
    if isinstance(keys, list):
        return ", ".join(str(k) for k in keys)
    return "" if keys is None else str(keys)


def _audit_digest(data: dict[str, Any]) -> str:
    """The digest a record is about: a release's workload, a policy's text."""
    for field in ("workload_digest", "sha256"):
        if isinstance(data.get(field), str):
            return str(data[field])
    return ""


def _audit_reason(data: dict[str, Any]) -> str:
    """The reason and, for a policy denial, each failed check on a line of its own."""
    lines = [str(data["reason"])] if data.get("reason") else []
    reasons = data.get("reasons")
    if isinstance(reasons, list):
        lines += [str(x) for x in reasons if str(x) not in lines]
    if data.get("denied") and not lines:
        lines.append("denied: " + ", ".join(str(k) for k in data["denied"]))
    return "\n".join(lines)


def _short(digest: str) -> str:
    """A digest as the table shows it: its first 12 hex digits, without the ``sha256:`` in
    front (``--json`` has all of it)."""
    hexits = digest.rpartition(":")[2]
    return f"{hexits[:12]}…" if len(hexits) > 12 else hexits


def audit_table(records: list[dict[str, Any]]) -> Any:
    """``audit show``: one row per record with its key(s) and digest (shortened; ``--json`` has
    it whole); a multi-line reason stays inside its cell (rich folds long values within their
    column, never across columns)."""
    from rich.table import Table

    table = Table(show_lines=True)
    table.add_column("seq", justify="right", no_wrap=True)
    table.add_column("at", overflow="fold", max_width=20)
    table.add_column("event", overflow="fold")
    table.add_column("result", no_wrap=True)
    table.add_column("key", overflow="fold")
    table.add_column("digest", no_wrap=True)
    table.add_column("reason", overflow="fold", ratio=1)
    for r in records:
        raw = r.get("data")
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        allowed = data.get("allowed")
        result = (
            ""
            if allowed is None
            else ("[green]allowed[/green]" if allowed else "[red]denied[/red]")
        )
        table.add_row(
            str(r.get("seq", "")),
            escape(str(r.get("at", ""))),
            escape(str(r.get("event", ""))),
            result,
            escape(_audit_key(data)),
            escape(_short(_audit_digest(data))),
            escape(_audit_reason(data)),
        )
    return table


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
        check_policy_history,
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
        check_policy_history(recs)
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
