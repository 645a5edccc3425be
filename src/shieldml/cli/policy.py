"""``shieldml policy init|check|eval``: write a release policy from a job, validate one, evaluate
one offline on evidence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from shieldml.cli._common import (
    EXISTING_FILE,
    JSON_OPTION,
    NotGenuine,
    TeeName,
    evidence_options,
    load_policy,
    verify,
)
from shieldml.cli._output import check_mark, emit_json, out
from shieldml.cli.attest import failure_dict
from shieldml.errors import OutputExistsError
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


@policy.command("init")
@click.option(
    "--from-job",
    "job",
    required=True,
    type=EXISTING_FILE,
    help="The job manifest (job.toml) whose runs the policy accepts.",
)
@click.option(
    "-o", "--output", default="policy.toml", show_default=True, type=click.Path(dir_okay=False)
)
@click.option(
    "--tee",
    type=TeeName(),
    help='The TEE the policy is for, where the job does not say (tee = "auto").',
)
@click.option(
    "--set",
    "values",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Pin a profile field (mrenclave, mrtd, measurement, ...; hex lists comma-separated).",
)
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT.")
@JSON_OPTION
def init(
    job: str,
    output: str,
    tee: str | None,
    values: tuple[str, ...],
    force: bool,
    as_json: bool,
) -> None:
    """Write a policy that accepts the job of --from-job: its workload digest, and the TEE's
    measurements (a simulated TEE's from the job's [simulated] table; a real TEE's code
    measurements with --set, the TDX RTMR the runner extends computed from the digest)."""
    from shieldml.runner.job_policy import policy_from_job
    from shieldml.runner.manifest import JobManifest

    if Path(output).exists() and not force:
        raise OutputExistsError(f"{output}: already exists", hint="--force replaces it")
    pairs: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r} is not FIELD=VALUE", param_hint="--set")
        pairs[name.strip()] = value
    made = policy_from_job(JobManifest.load(job), tee=tee, values=pairs, source=job)
    Path(output).write_text(made.text, encoding="utf-8")
    summary = {
        "path": output,
        "tee": made.tee.value,
        "workload_digest": made.workload_digest,
        "unpinned": list(made.unpinned),
        "notes": list(made.notes),
    }
    if as_json:
        emit_json(summary)
        return
    out.print(f"wrote {escape(output)}: one {made.tee} profile for workload {made.workload_digest}")
    for note in made.notes:
        out.print(f"  {escape(note)}")
    if made.unpinned:
        out.print(
            f'[yellow]not pinned ("any"): {", ".join(made.unpinned)}; --set them to '
            "accept only the measured TEE[/yellow]"
        )


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
