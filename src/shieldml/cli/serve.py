"""``shieldml serve`` (a model server in the TEE behind attested TLS) and ``shieldml proxy``
(plain HTTP on localhost to an attested upstream, for unmodified clients)."""

from __future__ import annotations

import threading
import urllib.parse
from typing import Any

import click
from rich.markup import escape

from shieldml.cli._common import (
    EXISTING_FILE,
    EXIT_RUNNER,
    JSON_OPTION,
    JSON_OPTION_CALLBACK,
    load_policy,
    receipt_trust,
    simulated_platform_option,
    trust_root_options,
)
from shieldml.cli._output import emit_json_line, err, headline, invocation, out, refusal_lines
from shieldml.errors import ShieldError


class _ServeCommand(click.Command):
    """As ``shieldml run``: every failure of the runner exits with the runner's code."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        invocation().failure_code = EXIT_RUNNER
        return super().parse_args(ctx, args)


def _runner_code(_ctx: click.Context, _param: click.Parameter, value: int) -> int:
    invocation().failure_code = value
    return value


@click.command(cls=_ServeCommand)
@click.option("-m", "--manifest", required=True, type=EXISTING_FILE, help="job.toml with [serve].")
@click.option(
    "--listen",
    metavar="HOST:PORT",
    help="The public TLS address (default: [serve] listen, else 0.0.0.0:8443).",
)
@click.option("--receipt", type=click.Path(dir_okay=False), help="Write a run receipt here.")
@click.option(
    "--runner-exit-code",
    type=click.IntRange(1, 255),
    default=EXIT_RUNNER,
    show_default=True,
    is_eager=True,
    expose_value=False,
    callback=_runner_code,
    help="Exit with this code when the runner itself fails (the program's own exit codes pass"
    " through).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    is_eager=True,
    callback=JSON_OPTION_CALLBACK,
    help='Progress as JSON objects, one per line on stderr: {"event": "listening", ...} once'
    " serving, then the run's report (or its error); stdout stays the program's.",
)
@click.pass_context
def serve(
    ctx: click.Context, /, manifest: str, listen: str | None, receipt: str | None, as_json: bool
) -> None:
    """Run the model server of MANIFEST in this TEE behind attested TLS; exit with its exit code.

    As `shieldml run`: measure, attest, release the keys, decrypt into the private root, start
    the program. Then generate a TLS key in this process, wait until the program answers on
    127.0.0.1:[serve] port, and listen on --listen with TLS: every connection can fetch fresh
    evidence bound to its TLS key (/.well-known/shieldml/attestation?nonce=...), then reaches
    the program as a byte stream. Clients verify with `shieldml proxy` or shieldml.client.
    """
    from shieldml.serve import TlsIdentity, serve_job

    def ready(address: tuple[str, int], identity: TlsIdentity) -> None:
        doc = {
            "event": "listening",
            "address": f"{address[0]}:{address[1]}",
            "url": f"https://{address[0]}:{address[1]}",
            "spki_sha256": identity.spki_sha256,
            "workload_digest": report.get("workload_digest"),
        }
        if as_json:
            emit_json_line(doc)

    report: dict[str, Any] = {}
    status = serve_job(
        manifest,
        listen=listen,
        receipt=receipt,
        log=None if as_json else lambda s: err.print(f"[dim]shieldml:[/dim] {escape(s)}"),
        report=report,
        on_ready=ready,
    )
    if as_json:
        emit_json_line({"ok": True, "exit_code": status, "receipt": None} | report)
    ctx.exit(status)


def _upstream(url: str) -> tuple[str, int]:
    u = urllib.parse.urlsplit(url)
    if u.scheme != "https" or not u.hostname or (u.path not in ("", "/")) or u.query:
        raise click.BadParameter(
            f"{url!r}: give https://HOST:PORT (the `shieldml serve` front)", param_hint="--upstream"
        )
    return u.hostname, u.port or 443


@click.command()
@click.option(
    "--upstream", required=True, metavar="URL", help="https://HOST:PORT of `shieldml serve`."
)
@click.option(
    "--policy",
    "policy_file",
    required=True,
    type=EXISTING_FILE,
    help="Release policy (the broker's TOML format); every profile must pin workload_digest.",
)
@click.option(
    "--listen", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
    help="Local plain-HTTP address (keep it on loopback).",
)  # fmt: skip
@click.option(
    "--reattest-interval",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="Also attest a fresh connection every this many seconds; a refusal closes every open"
    " upstream connection (0: only on new connections).",
)
@trust_root_options
@simulated_platform_option
@JSON_OPTION
def proxy(
    upstream: str,
    policy_file: str,
    listen: str,
    reattest_interval: float,
    trust_root: tuple[str, ...],
    insecure_custom_root: bool,
    simulated_platform: str | None,
    as_json: bool,
) -> None:
    """Plain HTTP on --listen, attested TLS to --upstream: for curl, SDKs and browsers.

    Every new local connection gets a new upstream connection whose fresh evidence (bound to a
    nonce and that connection's TLS key) must satisfy --policy before anything is forwarded; a
    refusal answers 502 with the failed checks and is printed as `attest explain` prints it.
    """
    from datetime import UTC, datetime

    from shieldml.client import Verifier
    from shieldml.client.proxy import Proxy
    from shieldml.serve import parse_listen

    host, port = _upstream(upstream)
    pol = load_policy(policy_file)
    anchors = receipt_trust(trust_root, insecure_custom_root, simulated_platform, datetime.now(UTC))
    verifier = Verifier(pol, trust=anchors)

    def refused(e: ShieldError) -> None:
        if as_json:
            from shieldml.cli._output import error_document

            emit_json_line({"event": "refused"} | error_document("refused", e.message, 1, e))
            return
        err.print(f"[bold red]upstream refused:[/bold red] {escape(headline(e))}")
        for line in refusal_lines(e) or [escape(e.diagnostics())]:
            err.print(line)

    def log(s: str) -> None:
        if as_json:
            emit_json_line({"event": "log", "message": s})
        else:
            err.print(f"[dim]shieldml proxy:[/dim] {escape(s)}")

    p = Proxy(
        host,
        port,
        verifier,
        reattest_interval=reattest_interval or None,
        log=log,
        on_refusal=refused,
    )
    lhost, lport = parse_listen(listen)

    address = p.start(lhost, lport)
    if as_json:
        emit_json_line(
            {"event": "listening", "address": f"{address[0]}:{address[1]}", "upstream": upstream}
        )
    else:
        out.print(f"proxy on http://{address[0]}:{address[1]} -> {escape(upstream)} (attested)")
    try:
        threading.Event().wait()
    finally:
        p.close()


COMMANDS = (serve, proxy)
