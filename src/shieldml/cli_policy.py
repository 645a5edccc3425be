"""``shieldml policy check|eval``: validate a release policy, evaluate it offline on evidence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from shieldml.cli_attest import _options, _verify, out
from shieldml.errors import PolicyError
from shieldml.policy import Policy, evaluate


def _load(path: str) -> Policy:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"{path}: cannot read policy: {e}") from e
    return Policy.from_toml(text, path)


@click.group()
def policy() -> None:
    """Release policies: which TEEs may receive a key."""


@policy.command()
@click.argument("policy_file", metavar="POLICY", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check(policy_file: str, as_json: bool) -> None:
    """Validate POLICY: schema, values, and that every profile pins the code it accepts."""
    pol = _load(policy_file)
    summary: list[dict[str, Any]] = [
        {"profile": i + 1, "tee": p.tee.value, "insecure": sorted(p.insecure)}
        for i, p in enumerate(pol.profiles)
    ]
    if as_json:
        click.echo(json.dumps({"valid": True, "profiles": summary}, indent=2))
        return
    out.print(f"{escape(policy_file)}: valid, {len(summary)} profile(s)")
    for s in summary:
        warn = f"  [yellow]insecure: {', '.join(s['insecure'])}[/yellow]" if s["insecure"] else ""
        out.print(f"  profile {s['profile']}: {s['tee']}{warn}")


@policy.command("eval")
@click.argument("policy_file", metavar="POLICY", type=click.Path(exists=True, dir_okay=False))
@_options
@click.option("--workload-digest", help="The workload digest the runner reports.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def eval_(
    ctx: click.Context, /, policy_file: str, workload_digest: str | None, as_json: bool, **kw: Any
) -> None:
    """Verify EVIDENCE, then evaluate POLICY on it; exit 0 if released, 1 if denied."""
    pol = _load(policy_file)
    claims, error = _verify(**kw)
    if error is not None:
        doc = {"allowed": False, "genuine": False, "reasons": [error.diagnostics()]}
        if as_json:
            click.echo(json.dumps(doc, indent=2))
        else:
            out.print(
                f"[bold red]denied: evidence not genuine[/bold red]\n{escape(error.diagnostics())}"
            )
        ctx.exit(1)
    if claims is None:  # unreachable: _verify returns claims or an error
        raise PolicyError("no result")
    verdict = evaluate(pol, claims, workload_digest)
    if as_json:
        click.echo(json.dumps({"genuine": True, **verdict.to_dict()}, indent=2))
    else:
        for res in verdict.profiles:
            table = Table(
                title=f"profile {res.index} ({res.tee}): {'passed' if res.passed else 'failed'}"
            )
            for col in ("", "check", "expected", "found", "hint"):
                table.add_column(col, overflow="fold")
            for c in res.checks:
                table.add_row(
                    "[green]✓[/green]" if c.passed else "[red]✗[/red]",
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
