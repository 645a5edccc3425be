"""``shieldml attest verify|explain`` (is this evidence genuine, and why (not)?) and
``shieldml trust import|fetch|list`` (the local store of vendor certificates)."""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from shieldml.attest import Check, GpuClaims, TrustStore, default_store, fingerprint, http_fetcher
from shieldml.cli._common import (
    EXISTING_FILE,
    GPU_TEE,
    JSON_OPTION,
    NotGenuine,
    attest_evidence_options,
    verify,
    verify_gpu,
)
from shieldml.cli._output import check_mark, emit, emit_json, out
from shieldml.errors import AttestationError


def failure_dict(e: NotGenuine) -> dict[str, Any]:
    """Evidence refused, as JSON: the failed check by its parts, and every check run."""
    error = e.error
    return {
        "genuine": False,
        "error": type(error).__name__,
        "failed_check": e.failed_check,
        "message": error.message,
        "expected": error.expected if isinstance(error, AttestationError) else None,
        "found": error.found if isinstance(error, AttestationError) else None,
        "hint": error.hint,
        "reasons": [error.diagnostics()],
        "checks": [c.to_dict() for c in e.checks],
    }


@click.group()
def attest() -> None:
    """Verify and explain TEE attestation evidence."""


def _cpu(kw: dict[str, Any]) -> dict[str, Any]:
    """The options of the CPU evidence: without the GPU-only ones, which must not be set."""
    gpu_only = {k: kw.pop(k) for k in ("nonce", "ocsp", "rim")}
    if any(gpu_only.values()):
        raise click.UsageError("--nonce, --ocsp and --rim are for --tee nvidia-gpu")
    return kw


def _gpu_dict(gpus: list[GpuClaims], *, checks: bool = False) -> dict[str, Any]:
    ds = [
        g.to_dict() | ({"checks": [c.to_dict() for c in g.checks]} if checks else {}) for g in gpus
    ]
    return ds[0] if len(ds) == 1 else {"genuine": True, "tee": GPU_TEE, "gpus": ds}


def _gpu_line(g: GpuClaims) -> str:
    rims = (
        f"RIMs {', '.join(g.rim_ids)} matched"
        if g.measurements_matched
        else "measurements not checked (no RIMs)"
    )
    ocsp = {o.status for o in g.ocsp}
    return (
        f"[bold green]genuine[/bold green] NVIDIA {escape(g.arch)} {escape(g.hwmodel)} "
        f"(ueid {g.ueid}); driver {g.driver_version or 'n/a'}, VBIOS {g.vbios_version}; "
        f"{rims}; OCSP {', '.join(sorted(ocsp)) or 'n/a'}"
    )


@attest.command("verify")
@attest_evidence_options
@JSON_OPTION
@click.pass_context
def attest_verify(ctx: click.Context, /, as_json: bool, **kw: Any) -> None:
    """Exit 0 if FILE is genuine TEE evidence at a matching TCB level, 1 otherwise.

    With ``--tee nvidia-gpu`` FILE is NVIDIA GPU/NVSwitch evidence: NVIDIA's serialized JSON
    (every GPU in it is verified), or a report's hex text with ``--cert-chain``; verification
    is offline (``--ocsp``, ``--rim`` are the collateral) at ``--at``."""
    if kw["tee"] == GPU_TEE:
        try:
            gpus = verify_gpu(**kw)
        except NotGenuine as e:
            if as_json:
                emit_json(failure_dict(e))
            else:
                out.print(f"[bold red]not genuine:[/bold red] {escape(e.error.diagnostics())}")
            ctx.exit(1)
        if as_json:
            emit_json(_gpu_dict(gpus))
            return
        for g in gpus:
            out.print(_gpu_line(g))
            if g.root.value != "vendor":
                out.print(f"[yellow]root: {g.root.value}[/yellow]")
        return
    try:
        claims = verify(**_cpu(kw))
    except NotGenuine as e:
        if as_json:
            emit_json(failure_dict(e))
        else:
            out.print(f"[bold red]not genuine:[/bold red] {escape(e.error.diagnostics())}")
        ctx.exit(1)
    d = claims.to_dict()
    if as_json:
        emit_json(d)
        return
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
@attest_evidence_options
@JSON_OPTION
@click.pass_context
def explain(ctx: click.Context, /, as_json: bool, **kw: Any) -> None:
    """Print every check run on FILE, what it compared and what would fix a failure.

    Exit 1 if FILE is not genuine; with --json, every check (``checks``) and the verdict.
    """
    if kw["tee"] == GPU_TEE:
        try:
            gpus = verify_gpu(**kw)
        except NotGenuine as e:
            if as_json:
                emit_json(failure_dict(e))
                ctx.exit(1)
            _checks_table(kw["file"], e.checks)
            out.print(f"[bold red]verdict: not genuine[/bold red]\n{escape(e.error.diagnostics())}")
            ctx.exit(1)
        if as_json:
            emit_json(_gpu_dict(gpus, checks=True))
            return
        for g in gpus:
            _checks_table(kw["file"], list(g.checks))
            out.print(_gpu_line(g).replace("genuine", "verdict: genuine", 1))
        return
    try:
        claims = verify(**_cpu(kw))
    except NotGenuine as e:
        if as_json:
            emit_json(failure_dict(e))
            ctx.exit(1)
        _checks_table(kw["file"], e.checks)
        out.print(f"[bold red]verdict: not genuine[/bold red]\n{escape(e.error.diagnostics())}")
        ctx.exit(1)
    d = claims.to_dict()
    if as_json:
        emit_json(d | {"checks": [c.to_dict() for c in claims.checks]})
        return
    _checks_table(kw["file"], list(claims.checks))
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


def _checks_table(file: str, checks: list[Check]) -> None:
    table = Table(title=f"attestation checks for {escape(file)}")
    table.add_column("")
    table.add_column("check")
    table.add_column("result")
    for c in checks:
        table.add_row(check_mark(c.passed), escape(c.name), escape(c.detail))
    out.print(table)


@click.group()
def trust() -> None:
    """Manage the local store of vendor certificates (Intel SGX root, AMD ARK/ASK/ASVK)."""


_STORE = click.option(
    "--store",
    type=click.Path(file_okay=False),
    help=f"Store directory (default {default_store()}).",
)


@trust.command("import")
@click.argument("file", type=EXISTING_FILE)
@_STORE
@JSON_OPTION
def trust_import(file: str, store: str | None, as_json: bool) -> None:
    """Import vendor certificates from FILE (PEM or DER).

    Refuses anything that is neither a pinned root nor signed by one.
    """
    ts = TrustStore(store)
    _stored(as_json, ts, ts.import_file(file))


@trust.command("fetch")
@_STORE
@JSON_OPTION
def trust_fetch(store: str | None, as_json: bool) -> None:
    """Download Intel's SGX root and AMD's chains, check them against the pins, store them."""
    ts = TrustStore(store)
    _stored(as_json, ts, ts.fetch(http_fetcher()))


@trust.command("list")
@_STORE
@JSON_OPTION
def trust_list(store: str | None, as_json: bool) -> None:
    """List the stored vendor certificates."""
    ts = TrustStore(store)
    rows = [
        {"subject": c.subject.rfc4514_string(), "sha256": fingerprint(c)} for c in ts.certificates()
    ]
    if as_json:
        emit_json({"store": str(ts.dir), "certificates": rows})
        return
    for r in rows:
        out.print(f"{r['sha256'][:16]}…  {escape(r['subject'])}")
    if not rows:
        out.print(f"{ts.dir}: empty (run `shieldml trust fetch` or `shieldml trust import FILE`)")


def _stored(as_json: bool, ts: TrustStore, names: list[str]) -> None:
    emit(
        {"store": str(ts.dir), "imported": names},
        as_json,
        f"stored {len(names)} certificate(s) in {ts.dir}: {', '.join(names)}",
    )


COMMANDS = (attest, trust)
