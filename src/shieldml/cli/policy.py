"""``shieldml policy check|eval``: validate a release policy, evaluate it offline on evidence."""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from shieldml.cli._common import (
    EXISTING_FILE,
    JSON_OPTION,
    NotGenuine,
    evidence_options,
    load_policy,
    verify,
)
from shieldml.cli._output import check_mark, emit_json, out
from shieldml.cli.attest import failure_dict
from shieldml.policy import evaluate


@click.group()
def policy() -> None:
    """Release policies: which TEEs may receive a key."""


@policy.command()
@click.argument("policy_file", metavar="POLICY", type=EXISTING_FILE)
@JSON_OPTION
def check(policy_file: str, as_json: bool) -> None:
    """Validate POLICY: schema, values, and that every profile pins the code it accepts."""
    pol = load_policy(policy_file)
    summary: list[dict[str, Any]] = [
        {"profile": i + 1, "tee": p.tee.value, "insecure": sorted(p.insecure)}
        for i, p in enumerate(pol.profiles)
    ]
    if as_json:
        emit_json({"valid": True, "profiles": summary})
        return
    out.print(f"{escape(policy_file)}: valid, {len(summary)} profile(s)")
    for s in summary:
        warn = f"  [yellow]insecure: {', '.join(s['insecure'])}[/yellow]" if s["insecure"] else ""
        out.print(f"  profile {s['profile']}: {s['tee']}{warn}")


@policy.command("eval")
@click.argument("policy_file", metavar="POLICY", type=EXISTING_FILE)
@evidence_options
@click.option("--workload-digest", help="The workload digest the runner reports.")
@JSON_OPTION
@click.pass_context
def eval_(
    ctx: click.Context, /, policy_file: str, workload_digest: str | None, as_json: bool, **kw: Any
) -> None:
    """Verify EVIDENCE, then evaluate POLICY on it; exit 0 if released, 1 if denied."""
    pol = load_policy(policy_file)
    try:
        claims = verify(**kw)
    except NotGenuine as e:
        reason = e.error.diagnostics()
        if as_json:
            emit_json({"allowed": False} | failure_dict(e))
        else:
            out.print(f"[bold red]denied: evidence not genuine[/bold red]\n{escape(reason)}")
        ctx.exit(1)
    verdict = evaluate(pol, claims, workload_digest)
    if as_json:
        emit_json({"genuine": True, **verdict.to_dict()})
    else:
        for res in verdict.profiles:
            table = Table(
                title=f"profile {res.index} ({res.tee}): {'passed' if res.passed else 'failed'}"
            )
            for col in ("", "check", "expected", "found", "hint"):
                table.add_column(col, overflow="fold")
            for c in res.checks:
                table.add_row(
                    check_mark(c.passed),
                    c.name,
                    escape(c.expected),
                    escape(c.actual),
                    "" if c.passed else escape(c.hint),
                )
            out.print(table)
        out.print(
            "[bold green]released[/bold green]"
            if verdict.allowed
            else "[bold red]denied[/bold red]"
        )
    if not verdict.allowed:
        ctx.exit(1)


COMMANDS = (policy,)
