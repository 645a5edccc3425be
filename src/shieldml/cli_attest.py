"""``shieldml attest verify|explain``: is this evidence genuine, and why (not)?"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shieldml.attest import (
    TEE_CHOICES,
    Check,
    Claims,
    IntelCollateral,
    TrustAnchors,
    _certs,
    verify_evidence,
)
from shieldml.attest._trust import anchors_from_files, fingerprint
from shieldml.attest._truststore import TrustStore, default_store
from shieldml.errors import AttestationError, FormatError, ShieldError

out = Console(highlight=False, soft_wrap=True)


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ShieldError(f"{path}: cannot read {what}: {e.strerror}") from e


def _time(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 time: {value!r}", param_hint="--at") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _trust(roots: tuple[str, ...], insecure: bool) -> TrustAnchors:
    return anchors_from_files(roots, insecure_custom_root=insecure)


def _verify(
    file: str, tee: str, collateral: str | None, vcek: str | None, cert_chain: str | None,
    at: str | None, trust_root: tuple[str, ...], insecure_custom_root: bool,
) -> tuple[Claims | None, AttestationError | FormatError | None]:  # fmt: skip
    data = _read(file, "evidence") or b""
    col = None
    if collateral:
        col = IntelCollateral.from_json(_read(collateral, "collateral") or b"")
    chain = None
    if cert_chain:
        try:
            chain = _certs.pem_certificates(_read(cert_chain, "certificate chain") or b"")
        except ValueError as e:
            raise ShieldError(f"{cert_chain}: not a PEM certificate chain") from e
    elif vcek:
        chain = TrustStore().certificates() or None  # ASK/ARK from `shieldml trust import|fetch`
    try:
        claims = verify_evidence(
            data, tee=tee, collateral=col, vcek=_read(vcek, "VCEK"), cert_chain=chain,
            now=_time(at), trust=_trust(trust_root, insecure_custom_root),
        )  # fmt: skip
    except (AttestationError, FormatError) as e:
        return None, e
    return claims, None


def _options(f: Any) -> Any:
    for opt in reversed(
        [
            click.argument("file", type=click.Path(exists=True, dir_okay=False)),
            click.option(
                "--tee", type=click.Choice(TEE_CHOICES), default="auto", show_default=True
            ),
            click.option(
                "--collateral",
                type=click.Path(exists=True, dir_okay=False),
                help="Intel collateral JSON.",
            ),
            click.option(
                "--vcek",
                type=click.Path(exists=True, dir_okay=False),
                help="SEV-SNP VCEK/VLEK (DER or PEM), or the extended report's certificate table.",
            ),
            click.option(
                "--cert-chain",
                type=click.Path(exists=True, dir_okay=False),
                help="AMD ASK/ARK chain (PEM).",
            ),
            click.option("--at", help="Verification time, ISO 8601 (default: now)."),
            click.option(
                "--trust-root",
                multiple=True,
                type=click.Path(exists=True, dir_okay=False),
                help="Extra root certificate.",
            ),
            click.option(
                "--insecure-custom-root",
                is_flag=True,
                help="Allow --trust-root certificates that are not vendor roots.",
            ),
        ]
    ):
        f = opt(f)
    return f


def _failure_dict(e: AttestationError | FormatError) -> dict[str, Any]:
    checks = getattr(e, "checks", [])
    return {
        "genuine": False,
        "error": type(e).__name__,
        "failed_check": getattr(e, "check", "format"),
        "reasons": [e.diagnostics()],
        "checks": [c.to_dict() for c in checks if isinstance(c, Check)],
    }


@click.group()
def attest() -> None:
    """Verify and explain TEE attestation evidence."""


@attest.command()
@_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def verify(ctx: click.Context, /, as_json: bool, **kw: Any) -> None:
    """Exit 0 if FILE is genuine TEE evidence at a matching TCB level, 1 otherwise."""
    claims, error = _verify(**kw)
    if error is not None:
        if as_json:
            click.echo(json.dumps(_failure_dict(error), indent=2))
        else:
            out.print(f"[bold red]not genuine:[/bold red] {escape(error.diagnostics())}")
        ctx.exit(1)
    if claims is None:  # unreachable: _verify returns claims or an error
        raise ShieldError("no result")
    if as_json:
        click.echo(json.dumps(claims.to_dict(), indent=2))
        return
    d = claims.to_dict()
    status = d["tcb_status"] or "n/a (SEV-SNP: see reported TCB)"
    out.print(
        f"[bold green]genuine[/bold green] {d['tee']} evidence; TCB {status}"
        + (f"; advisories {', '.join(d['advisory_ids'])}" if d["advisory_ids"] else "")
    )
    if claims.root.value != "vendor":
        out.print(f"[yellow]root: {claims.root.value}[/yellow]")
    if claims.debug:
        out.print("[yellow]debug mode: on[/yellow]")


@attest.command()
@_options
@click.pass_context
def explain(ctx: click.Context, /, **kw: Any) -> None:
    """Print every check run on FILE, what it compared and what would fix a failure."""
    claims, error = _verify(**kw)
    checks = (
        list(claims.checks)
        if claims
        else [c for c in getattr(error, "checks", []) if isinstance(c, Check)]
    )
    table = Table(title=f"attestation checks for {escape(kw['file'])}")
    table.add_column("")
    table.add_column("check")
    table.add_column("result")
    for c in checks:
        table.add_row(
            "[green]✓[/green]" if c.passed else "[red]✗[/red]", escape(c.name), escape(c.detail)
        )
    out.print(table)
    if error is not None:
        out.print(f"[bold red]verdict: not genuine[/bold red]\n{escape(error.diagnostics())}")
        ctx.exit(1)
    if claims is None:  # unreachable: _verify returns claims or an error
        raise ShieldError("no result")
    d = claims.to_dict()
    out.print(
        f"[bold green]verdict: genuine[/bold green] {d['tee']}, TCB {d['tcb_status'] or 'n/a'}, debug {'on' if d['debug'] else 'off'}, root {d['root']}"
    )
    m = Table(title="measurements", show_header=False)
    m.add_column("name")
    m.add_column("value", overflow="fold")
    for name, value in d["measurements"].items():
        m.add_row(name, escape(str(value)))
    m.add_row("report_data", d["report_data"])
    out.print(m)


@click.group()
def trust() -> None:
    """Manage the local store of vendor certificates (Intel SGX root, AMD ARK/ASK/ASVK)."""


_STORE = click.option(
    "--store",
    type=click.Path(file_okay=False),
    help=f"Store directory (default {default_store()}).",
)


@trust.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@_STORE
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def trust_import(file: str, store: str | None, as_json: bool) -> None:
    """Import vendor certificates from FILE (PEM or DER).

    Refuses anything that is neither a pinned root nor signed by one.
    """
    ts = TrustStore(store)
    _report(as_json, ts, ts.import_file(file))


@trust.command("fetch")
@_STORE
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def trust_fetch(store: str | None, as_json: bool) -> None:
    """Download Intel's SGX root and AMD's chains, check them against the pins, store them."""
    from shieldml.attest._fetch import http_fetcher

    ts = TrustStore(store)
    _report(as_json, ts, ts.fetch(http_fetcher()))


@trust.command("list")
@_STORE
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def trust_list(store: str | None, as_json: bool) -> None:
    """List the stored vendor certificates."""
    ts = TrustStore(store)
    rows = [
        {"subject": c.subject.rfc4514_string(), "sha256": fingerprint(c)} for c in ts.certificates()
    ]
    if as_json:
        click.echo(json.dumps({"store": str(ts.dir), "certificates": rows}, indent=2))
        return
    for r in rows:
        out.print(f"{r['sha256'][:16]}…  {escape(r['subject'])}")
    if not rows:
        out.print(f"{ts.dir}: empty (run `shieldml trust fetch` or `shieldml trust import FILE`)")


def _report(as_json: bool, ts: TrustStore, names: list[str]) -> None:
    if as_json:
        click.echo(json.dumps({"store": str(ts.dir), "imported": names}, indent=2))
    else:
        out.print(f"stored {len(names)} certificate(s) in {ts.dir}: {', '.join(names)}")
