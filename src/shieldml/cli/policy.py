"""``shieldml policy init|check|eval``: write a release policy from a job, validate one, evaluate
one offline on evidence."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from shieldml.attest import Claims, SgxMeasurements, TdxMeasurements
from shieldml.cli._common import (
    AT_OPTION,
    EXISTING_FILE,
    JSON_OPTION,
    NotGenuine,
    TeeName,
    evidence_options,
    load_policy,
    read_bytes,
    trust_root_options,
    verify,
)
from shieldml.cli._output import check_mark, emit_json, out
from shieldml.cli.attest import failure_dict
from shieldml.errors import OutputExistsError, PolicyError
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
    "--from-quote",
    "quote",
    type=EXISTING_FILE,
    help="Take the code's measurements from this reference evidence (SGX/TDX quote, SEV-SNP"
    " report, RA-TLS certificate), verified first with --collateral/--vcek/--cert-chain/--at.",
)
@click.option(
    "--from-sigstruct",
    "sigstruct",
    type=EXISTING_FILE,
    help="Take MRENCLAVE, MRSIGNER, ISVPRODID and ISVSVN from this SGX SIGSTRUCT (Gramine's"
    " .sig file), its signature verified first.",
)
@click.option("--collateral", type=EXISTING_FILE, help="With --from-quote: Intel collateral JSON.")
@click.option("--vcek", type=EXISTING_FILE, help="With --from-quote: SEV-SNP VCEK/VLEK.")
@click.option("--cert-chain", type=EXISTING_FILE, help="With --from-quote: AMD ASK/ARK (PEM).")
@click.option("--amd-crl", type=EXISTING_FILE, help="With --from-quote: AMD's CRL.")
@AT_OPTION
@trust_root_options
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
    help="Pin a profile field (mrenclave, mrtd, measurement, ...; hex lists comma-separated);"
    " wins over --from-quote/--from-sigstruct.",
)
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT.")
@JSON_OPTION
def init(
    job: str,
    quote: str | None,
    sigstruct: str | None,
    collateral: str | None,
    vcek: str | None,
    cert_chain: str | None,
    amd_crl: str | None,
    at: str | None,
    trust_root: tuple[str, ...],
    insecure_custom_root: bool,
    output: str,
    tee: str | None,
    values: tuple[str, ...],
    force: bool,
    as_json: bool,
) -> None:
    """Write a policy that accepts the job of --from-job: its workload digest, and the TEE's
    measurements (a simulated TEE's from the job's [simulated] table; a real TEE's from a
    verified reference quote (--from-quote), an SGX SIGSTRUCT (--from-sigstruct) or --set; the
    TDX RTMR the runner extends computed from the digest)."""
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
    if quote and sigstruct:
        raise click.UsageError("give one of --from-quote and --from-sigstruct")
    if not quote and (collateral or vcek or cert_chain or amd_crl or at or trust_root):
        raise click.UsageError(
            "--collateral, --vcek, --cert-chain, --amd-crl, --at and --trust-root go with"
            " --from-quote"
        )
    reference: dict[str, str] = {}
    origin: list[str] = []
    if quote:
        try:
            claims = verify(
                file=quote,
                tee="auto",
                collateral=collateral,
                vcek=vcek,
                cert_chain=cert_chain,
                at=at,
                trust_root=trust_root,
                insecure_custom_root=insecure_custom_root,
                amd_crl=amd_crl,
            )
        except NotGenuine as e:
            raise e.error from None  # nothing is written from evidence that is not genuine
        reference, origin = reference_values(claims), [f"measurements from {quote} (verified)"]
        if tee is not None and tee != claims.tee.value:
            raise PolicyError(f"--tee {tee}: {quote} is {claims.tee} evidence")
        tee = claims.tee.value
        if claims.debug:
            origin.append(f"{quote} is from a debug TEE: the policy refuses debug all the same")
    elif sigstruct:
        from shieldml.gramine.sigstruct import Sigstruct

        sig = Sigstruct.from_bytes(read_bytes(sigstruct, "SIGSTRUCT"), sigstruct)
        sig.verify(sigstruct)
        if tee not in (None, "sgx"):
            raise PolicyError(f"--tee {tee}: a SIGSTRUCT describes an SGX enclave")
        tee = "sgx"
        reference = {
            "mrenclave": sig.mrenclave.hex(),
            "mrsigner": sig.mrsigner.hex(),
            "isv_prod_id": str(sig.isv_prod_id),
            "min_isv_svn": str(sig.isv_svn),
        }
        origin = [f"measurements from {sigstruct} (signature verified)"]
        if sig.debug:
            origin.append(f"{sigstruct} signs a debug enclave: the policy refuses debug")
    given_by = f"--from-quote {quote}" if quote else f"--from-sigstruct {sigstruct}"
    try:
        made = policy_from_job(
            JobManifest.load(job),
            tee=tee,
            values=reference | pairs,
            source=job,
            measured_by=given_by + (" and --set" if pairs else "") if origin else "--set",
        )
    except PolicyError as e:
        if origin and e.message.startswith(f"--tee {tee}: "):  # the evidence is of another TEE
            raise PolicyError(
                f"{given_by}: {tee} evidence, but " + e.message.removeprefix(f"--tee {tee}: ")
            ) from None
        raise
    if origin:
        made = replace(made, notes=(*origin, *made.notes))
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


def reference_values(claims: Claims) -> dict[str, str]:
    """The profile fields (as ``--set`` text) that pin the code a reference quote measured.

    Left out: what the runner or the deployment sets per run (TDX RTMR3, extended with the
    workload digest; MRCONFIGID and SEV-SNP HOST_DATA, which carry init data), and SEV-SNP's
    ID/author keys where none was given (zeros).
    """
    m = claims.measurements
    if isinstance(m, SgxMeasurements):
        return {
            "mrenclave": m.mrenclave.hex(),
            "mrsigner": m.mrsigner.hex(),
            "isv_prod_id": str(m.isv_prod_id),
            "min_isv_svn": str(m.isv_svn),
        }
    if isinstance(m, TdxMeasurements):
        return {
            "mrtd": m.mrtd.hex(),
            "rtmr0": m.rtmr0.hex(),
            "rtmr1": m.rtmr1.hex(),
            "rtmr2": m.rtmr2.hex(),
        }
    values = {"measurement": m.measurement.hex(), "vmpl": str(m.vmpl)}
    for name in ("id_key_digest", "author_key_digest"):
        digest = getattr(m, name)
        if any(digest):
            values[name] = digest.hex()
    tcb = {k: claims.platform.get(f"reported_tcb_{k}") for k in ("bl", "tee", "snp", "ucode")}
    if all(v is not None and v.isdigit() for v in tcb.values()):
        values["min_reported_tcb"] = "{" + ", ".join(f"{k} = {v}" for k, v in tcb.items()) + "}"
    return values


COMMANDS = (policy,)
