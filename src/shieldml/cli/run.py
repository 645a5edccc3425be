"""``shieldml run``, ``shieldml job init|measure``, ``shieldml receipt verify``."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from shieldml.broker.tlog import NoteVerifier
from shieldml.cli._common import (
    AT_OPTION,
    EXISTING_FILE,
    EXIT_RUNNER,
    JSON_OPTION,
    JSON_OPTION_CALLBACK,
    TeeName,
    load_policy,
    parse_time,
    read_bytes,
    receipt_trust,
    simulated_platform_option,
    trust_root_options,
)
from shieldml.cli._output import emit_json, emit_json_line, invocation, out, refusal_lines
from shieldml.errors import OutputExistsError, PolicyDenied, ReceiptError, ShieldError
from shieldml.runner.manifest import (
    HashCache,
    JobManifest,
    ciphertext_digest,
    scaffold_manifest,
)


class _RunnerCommand(click.Command):
    """``shieldml run``: from the first word parsed, every failure exits with the runner's code
    (a usage error too), never with one the program could have chosen."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        invocation().failure_code = EXIT_RUNNER
        return super().parse_args(ctx, args)


def _runner_code(_ctx: click.Context, _param: click.Parameter, value: int) -> int:
    invocation().failure_code = value
    return value


@click.command(cls=_RunnerCommand, context_settings={"ignore_unknown_options": True})
@click.option("-m", "--manifest", required=True, type=EXISTING_FILE, help="job.toml")
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
    " through): pick one the program never uses.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    is_eager=True,
    callback=JSON_OPTION_CALLBACK,
    help="Print the runner's report (or its error) as one JSON object on one line of stderr,"
    " instead of its progress lines; stdout stays the program's. After `--`, --json is the"
    " program's.",
)
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(
    ctx: click.Context,
    /,
    manifest: str,
    receipt: str | None,
    as_json: bool,
    extra: tuple[str, ...],
) -> None:
    """Run the job of MANIFEST inside this TEE on its protected files; exit with its exit code.

    Exit 125 (or --runner-exit-code) if the runner fails: the keys are refused, the program
    does not start, or its outputs are not sealed. A refusal lists each failed check with what
    was expected, what was found and the fix.
    """
    from shieldml.runner.run import run_job

    report: dict[str, Any] = {}
    status = run_job(
        manifest,
        extra_args=extra,
        receipt=receipt,
        log=None if as_json else lambda s: out.print(f"[dim]shieldml:[/dim] {escape(s)}"),
        report=report,
    )
    if as_json:
        emit_json_line({"ok": True, "exit_code": status, "receipt": None} | report)
    ctx.exit(status)


@click.group()
def job() -> None:
    """Job manifests and their workload digest."""


@job.command("init")
@click.argument("files", nargs=-1, required=True, type=EXISTING_FILE)
@click.option(
    "-o", "--output", default="job.toml", show_default=True, type=click.Path(dir_okay=False)
)
@click.option("--tee", type=TeeName("auto", "simulated"), default="auto", show_default=True)
@click.option(
    "--python",
    "python",
    metavar="PATH",
    help="The interpreter in the TEE (a name is looked up on PATH now); written as an absolute "
    "path [default: the one running shieldml].",
)
@click.option(
    "--simulated-platform",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="With --tee simulated: the simulated platform's directory, made on first use; the broker "
    "trusts the same one (`shieldml broker serve --simulated-platform DIR`).  [default: "
    "sim-platform]",
)
@JSON_OPTION
def job_init(
    files: tuple[str, ...],
    output: str,
    tee: str,
    python: str | None,
    simulated_platform: str | None,
    as_json: bool,
) -> None:
    """Scaffold a manifest that runs the first FILE with python from its own directory; every FILE
    becomes trusted."""
    if Path(output).exists():
        raise OutputExistsError(f"{output}: already exists")
    if simulated_platform is not None and tee != "simulated":
        raise click.UsageError("--simulated-platform goes with --tee simulated")
    # given: as the broker's --simulated-platform, relative to here; default: beside the manifest
    platform = simulated_platform or str(Path(output).parent / "sim-platform")
    # argv[0] must be absolute (never looked up on a PATH in the TEE). Not resolved through
    # symbolic links: a virtual environment's python is a link, and resolving it loses the venv.
    # Default: the interpreter running shieldml (a `python3` found on PATH may be a wrapper, such
    # as a pyenv shim, that picks the real one from the environment).
    if python is None:
        interpreter = str(Path(sys.executable).absolute())
    else:
        found = python if os.sep in python else shutil.which(python)
        if found is None:
            raise ShieldError(f"--python {python}: not found on PATH; give its absolute path")
        interpreter = str(Path(found).absolute())
    text = scaffold_manifest(
        files, output=output, tee=tee, interpreter=interpreter, simulated_platform=platform
    )
    Path(output).write_text(text, encoding="utf-8")
    if as_json:
        emit_json(
            {
                "output": output,
                "interpreter": interpreter,
                "simulated_platform": platform if tee == "simulated" else None,
            }
        )
        return
    out.print(
        f"wrote {escape(output)} (interpreter {escape(interpreter)}); fill in brokers, inputs and outputs, then `shieldml job measure {escape(output)}`"
    )
    if tee == "simulated":
        out.print(
            f"simulated TEE: platform {escape(platform)} (made on first use); brokers trust it with"
            f" `shieldml broker serve --simulated-platform {escape(platform)}`, receipts with"
            f" `shieldml receipt verify --simulated-platform {escape(platform)}`"
        )


@job.command("measure")
@click.argument("manifest", type=EXISTING_FILE)
@click.option(
    "--hash-cache",
    type=click.Path(dir_okay=False),
    help="Reuse hashes of unchanged files (size, mtime, inode): for the owner's machine; "
    "`shieldml run` always hashes in full.",
)
@JSON_OPTION
def job_measure(manifest: str, hash_cache: str | None, as_json: bool) -> None:
    """Print the workload digest owners put in their policies."""
    m = JobManifest.load(manifest)
    cache = HashCache(hash_cache)
    files = m.trusted_files(cache)
    digest = m.workload_digest(cache)
    cache.save()
    if as_json:
        inputs = [
            {"path": i.path, "ciphertext": i.ciphertext, "sha256": ciphertext_digest(i.ciphertext)}
            for i in m.inputs
            if Path(i.ciphertext).exists()
        ]
        emit_json(
            {
                "workload_digest": digest,
                "trusted_files": [{"path": p, "sha256": h} for p, h in files],
                "inputs": inputs,
            }
        )
    else:
        out.print(digest)


@click.group()
def receipt() -> None:
    """Run receipts."""


#: the measurements a receipt verification prints, per TEE (what policies pin)
_RECEIPT_MEASUREMENTS = {
    "sgx": ("mrenclave", "mrsigner", "isv_prod_id", "isv_svn"),
    "tdx": ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id"),
    "snp": ("measurement", "host_data", "vmpl", "guest_svn", "reported_tcb"),
}


@receipt.command("verify")
@click.argument("file", type=EXISTING_FILE)
@click.option(
    "--policy",
    "policy_file",
    type=EXISTING_FILE,
    help="Required. The release policy (TOML, as set on the broker) the receipt's TEE must satisfy.",
)
@AT_OPTION
@trust_root_options
@simulated_platform_option
@click.option(
    "--no-files", is_flag=True, help="Do not compare the ciphertext files with the receipt."
)
@click.option(
    "--log-key",
    "log_keys",
    multiple=True,
    help="A broker's audit-log verifier key (`shieldml broker log-key`), or a file holding it: "
    "that broker's release must be in a checkpoint it signed (repeatable).",
)
@click.option(
    "--amd-crl",
    type=EXISTING_FILE,
    help="AMD's CRL (KDS /vcek/v1/PRODUCT/crl) for an SEV-SNP receipt: policies deny SEV-SNP "
    "evidence not checked against it.",
)
@JSON_OPTION
@click.pass_context
def receipt_verify(
    ctx: click.Context,
    /,
    file: str,
    policy_file: str | None,
    at: str | None,
    trust_root: tuple[str, ...],
    insecure_custom_root: bool,
    simulated_platform: str | None,
    no_files: bool,
    log_keys: tuple[str, ...],
    amd_crl: str | None,
    as_json: bool,
) -> None:
    """Check that a receipt was produced by a TEE that --policy accepts, running the job it names.

    The evidence must be genuine, bind the receipt, and satisfy --policy with the receipt's
    workload digest; debug, simulated and custom-root evidence only where the policy's
    insecure_allow_* switches say so. Then (by default) the files must match the receipt.
    Exit 1 if the policy denies the receipt's TEE or the files differ.
    """
    from shieldml.runner.receipt import verify_receipt

    if policy_file is None:
        raise click.UsageError(
            "--policy is required: genuine evidence alone does not say which code vouched for the"
            " receipt; give the release policy the owner set on the broker"
            " (`shieldml broker policy set`), which pins the measurements and workload digest"
        )
    pol = load_policy(policy_file)
    when = parse_time(at)
    anchors = receipt_trust(trust_root, insecure_custom_root, simulated_platform, when)
    problems: list[str] = []
    try:
        verified = verify_receipt(
            file,
            policy=pol,
            now=when,
            trust=anchors,
            check_files=not no_files,
            log_keys=[_log_verifier(k) for k in log_keys],
            amd_crl=read_bytes(amd_crl, "AMD CRL") if amd_crl else None,
        )
    except ReceiptError as e:
        if e.verified is None:  # the evidence does not bind the receipt
            raise
        verified, problems = e.verified, e.problems
    except PolicyDenied as e:
        if e.verdict is None:
            raise
        if as_json:
            emit_json({"ok": False, "verdict": e.verdict.to_dict()})
        else:
            out.print(
                f"[bold red]receipt refused: {escape(policy_file)} does not accept its TEE[/bold red]"
            )
            for line in refusal_lines(e) or []:
                out.print(line)
        ctx.exit(1)
    result = verified.to_dict() | {"ok": not problems, "problems": problems}
    if as_json:
        emit_json(result)
    else:
        r, c, v = result["receipt"], result["claims"], result["verdict"]
        out.print(
            f"receipt of workload {r['workload_digest']}, exit code {r['exit_code']}, evidence genuine ({c['tee']}, root {c['root']})"
        )
        matched = v["profiles"][v["matched_profile"] - 1]
        out.print(
            f"accepted by profile {v['matched_profile']} of {escape(policy_file)}: {c['tee']},"
            f" root {c['root']}, TCB {c['tcb_status'] or 'n/a'}, debug {'on' if c['debug'] else 'off'}"
        )
        out.print("measurements accepted:")
        for name in _RECEIPT_MEASUREMENTS.get(c["tee"], ()):
            if name in c["measurements"]:
                out.print(f"  {name} {escape(str(c['measurements'][name]))}")
        if matched["insecure_used"]:
            out.print(
                f"[yellow]insecure: accepted only through {', '.join(matched['insecure_used'])}[/yellow]"
            )
        for o in r.get("outputs", []):
            by = o.get("sealed_by")
            how = (
                f"sealed with key {by['key']!r} of broker {by['broker']!r} (key id {by['key_id']})"
                if by
                else "sealed to a recipient's public key"
            )
            out.print(f"output {escape(o['path'])}: {how}")
        for broker, size in verified.logged.items():
            out.print(
                f"release by broker {escape(broker)!r} is in its signed audit checkpoint of "
                f"{size} records"
            )
        for p in problems:
            out.print(f"[red]{escape(p)}[/red]")
    if problems:
        raise ShieldError("the files no longer match the receipt")


def _log_verifier(text: str) -> NoteVerifier:
    if "+" not in text or Path(text).is_file():
        text = Path(text).read_text().strip()
    return NoteVerifier.parse(text)


COMMANDS = (run, job, receipt)
