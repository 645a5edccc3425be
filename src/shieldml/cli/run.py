"""``shieldml run``, ``shieldml job init|measure``, ``shieldml receipt verify``."""

from __future__ import annotations

import os
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

import click

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
from shieldml.cli._output import emit_json, emit_json_line, escape, invocation, out, refusal_lines
from shieldml.errors import OutputExistsError, PolicyDenied, ReceiptError, ShieldError
from shieldml.runner.manifest import (
    HashCache,
    JobManifest,
    ciphertext_digest,
    scaffold_manifest,
    scaffold_protected,
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
    "-o",
    "--manifest",
    "output",
    default="job.toml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The manifest to write (never overwritten).",
)
@click.option(
    "--tee",
    type=TeeName("auto", "simulated"),
    help="The TEE the job runs in. [default: simulated with --simulated-platform; else auto "
    "where this machine has a TEE; else an error that asks for one]",
)
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="FILE|PATH=CIPHERTEXT",
    help="A protected file (or directory) the program reads: FILE where it opens it (Gramine's "
    "layout), or the PATH it opens (from the script's directory) and where the CIPHERTEXT "
    "lies. Repeatable.",
)
@click.option(
    "--output",
    "outputs",
    multiple=True,
    metavar="FILE|PATH=CIPHERTEXT",
    help="A file (a directory if it ends with /) the program writes, sealed at the same place or "
    "at CIPHERTEXT. Repeatable.",
)
@click.option(
    "--key-file",
    "key_files",
    multiple=True,
    type=EXISTING_FILE,
    help="A key of the inputs (stays here): job init reads with it the path each input was "
    "encrypted for, and writes it as its bind where that is not the path the program opens. "
    "Needed for gramine-pf inputs. Repeatable.",
)
@click.option("--input-key", default="model", show_default=True, help="The inputs' broker key.")
@click.option("--output-key", default="results", show_default=True, help="The outputs' key.")
@click.option(
    "--output-format",
    type=click.Choice(["stream", "gramine-pf"]),
    help="The outputs' format. [default: the inputs' format where they share one, else stream]",
)
@click.option(
    "--broker-url",
    envvar="SHIELDML_BROKER_URL",
    show_envvar=True,
    help="The broker holding the keys (with --input/--output).",
)
@click.option(
    "--broker-fingerprint",
    envvar="SHIELDML_BROKER_FINGERPRINT",
    show_envvar=True,
    help="SHA-256 of its TLS certificate (`shieldml broker fingerprint`).",
)
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
@click.option(
    "--gpus",
    type=click.IntRange(1, 16),
    metavar="N",
    help="The job uses N NVIDIA GPUs in confidential-computing mode: writes [gpu] (evidence of "
    "every GPU with every release); with --tee simulated, a simulated TDX VM with N simulated "
    "GPUs. Not with --tee sgx.",
)
@JSON_OPTION
def job_init(
    files: tuple[str, ...],
    output: str,
    tee: str | None,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    key_files: tuple[str, ...],
    input_key: str,
    output_key: str,
    output_format: str | None,
    broker_url: str | None,
    broker_fingerprint: str | None,
    python: str | None,
    simulated_platform: str | None,
    gpus: int | None,
    as_json: bool,
) -> None:
    """Write a manifest that runs the first FILE with python from its own directory, as written;
    every FILE becomes trusted, every --input and --output protected.

    Without --input/--output, brokers, inputs and outputs are left as commented examples.
    """
    from shieldml.files import load_key
    from shieldml.runner.evidence import machine_tee
    from shieldml.runner.run import needed_keys

    if Path(output).exists():
        raise OutputExistsError(f"{output}: already exists")
    if tee is None:
        if simulated_platform is not None:
            tee = "simulated"
        elif machine_tee() is not None:
            tee = "auto"
        else:
            raise click.UsageError(
                "this machine has no TEE (neither /dev/attestation nor configfs-tsm): pass --tee "
                "simulated to try the job here on a simulated TEE (brokers accept its evidence only"
                " with --simulated-platform), or --tee sgx, tdx, snp or auto for the machine"
                " it will run on"
            )
    if simulated_platform is not None and tee != "simulated":
        raise click.UsageError("--simulated-platform goes with --tee simulated")
    if gpus is not None and tee in ("sgx", "gramine"):
        raise click.UsageError(
            "--gpus needs a confidential VM (--tee tdx, snp, auto or simulated): an SGX enclave"
            " cannot own a GPU"
        )
    if (inputs or outputs) and not broker_url:
        raise click.UsageError(
            "--input/--output need the broker holding their keys: --broker-url (or "
            "SHIELDML_BROKER_URL) and, for https, --broker-fingerprint"
        )
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
    base = Path(output).resolve().parent
    cwd = Path(files[0]).resolve().parent
    keys = [load_key(k) for k in key_files]
    broker_tables = []
    if broker_url:
        broker_tables.append(
            {"name": "owner", "url": broker_url}
            | ({"fingerprint": broker_fingerprint} if broker_fingerprint else {})
        )
    ins = [
        scaffold_protected(
            spec, output=False, cwd=cwd, base=base, key=input_key, broker="owner", key_files=keys
        )
        for spec in inputs
    ]
    in_formats = {t["format"] for t in ins}
    out_fmt = output_format or (in_formats.pop() if len(in_formats) == 1 else "stream")
    outs = [
        scaffold_protected(
            spec, output=True, cwd=cwd, base=base, key=output_key, broker="owner", fmt=out_fmt
        )
        for spec in outputs
    ]
    text = scaffold_manifest(
        files,
        output=output,
        tee=tee,
        interpreter=interpreter,
        simulated_platform=platform,
        gpus=gpus,
        brokers=broker_tables if ins or outs else None,
        inputs=ins,
        outputs=outs,
    )
    # runs as written: the manifest's own checks (paths, nesting, keys' formats) before writing
    written = JobManifest.from_dict(tomllib.loads(text), Path(output).resolve())
    needed_keys(written)
    Path(output).write_text(text, encoding="utf-8")
    decrypt_rows = [
        f"shieldml decrypt {o.ciphertext} PLAIN --key KEY --bind {o.bound}" for o in written.outputs
    ]
    if as_json:
        emit_json(
            {
                "output": output,
                "tee": tee,
                "interpreter": interpreter,
                "simulated_platform": platform if tee == "simulated" else None,
                "gpus": gpus,
                "inputs": [
                    {
                        "path": i.path,
                        "ciphertext": i.ciphertext,
                        "format": i.format,
                        "bind": i.bound,
                    }
                    for i in written.inputs
                ],
                "outputs": [
                    {
                        "path": o.path,
                        "ciphertext": o.ciphertext,
                        "format": o.format,
                        "bind": o.bound,
                    }
                    for o in written.outputs
                ],
            }
        )
        return
    todo = "" if ins or outs else "; fill in brokers, inputs and outputs"
    out.print(
        f"wrote {escape(output)} (tee {tee}, interpreter {escape(interpreter)}){todo}, then `shieldml job measure {escape(output)}`"
    )
    for i in written.inputs:
        checked = any(len(k) == (16 if i.format == "gramine-pf" else 32) for k in keys)
        note = "" if checked else " (not checked: no --key-file of its format)"
        out.print(
            f"input {escape(i.path)}: {i.format} at {escape(i.ciphertext)}, bound to {escape(repr(i.bound))}{note}"
        )
    for row in decrypt_rows:
        out.print(f"an output, after the run: {escape(row)}")
    if gpus is not None:
        pin = "" if tee == "simulated" else f" (--set gpu.count={gpus} and the approved versions)"
        out.print(
            f"GPUs: {gpus}, evidence of each with every release; `shieldml policy init --from-job"
            f" {escape(output)}` requires them{pin}"
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
    """Print the workload digest owners put in their policies, then each input: the ciphertext
    digest its ``sha256`` pins (part of the workload digest) and whether the file matches it."""
    m = JobManifest.load(manifest)
    cache = HashCache(hash_cache)
    files = m.trusted_files(cache)
    digest = m.workload_digest(cache)
    cache.save()
    inputs: list[dict[str, Any]] = []
    for i in m.inputs:
        now = ciphertext_digest(i.ciphertext) if Path(i.ciphertext).exists() else None
        inputs.append(
            {
                "path": i.path,
                "ciphertext": i.ciphertext,
                "bind": i.bound,
                "sha256": now,  # the ciphertext's digest now (None: absent)
                "pinned": i.sha256,  # what [[input]] sha256 pins (None: not pinned)
                "matches": None if i.sha256 is None else now == i.sha256,
            }
        )
    if as_json:
        emit_json(
            {
                "workload_digest": digest,
                "trusted_files": [{"path": p, "sha256": h} for p, h in files],
                "inputs": inputs,
            }
        )
        return
    out.print(digest)
    for doc in inputs:
        where = escape(doc["ciphertext"])
        if doc["pinned"] is None:
            now = f"now sha256 {doc['sha256']}" if doc["sha256"] else "absent now"
            out.print(f"input {escape(doc['path'])}: not pinned ({where} {now})")
        else:
            state = (
                "matches"
                if doc["matches"]
                else ("absent" if doc["sha256"] is None else f"DIFFERS: {doc['sha256']}")
            )
            out.print(
                f"input {escape(doc['path'])}: pinned sha256 {doc['pinned']} ({where} {state})"
            )


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
    failure: ReceiptError | None = None
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
        verified, problems, failure = e.verified, e.problems, e
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
        what = (
            "CPU evidence accepted (its GPUs are not: below)"
            if failure is not None and failure.gpus
            else "accepted"
        )
        out.print(
            f"{what} by profile {v['matched_profile']} of {escape(policy_file)}: {c['tee']},"
            f" root {c['root']}, TCB {c['tcb_status'] or 'n/a'}, debug {'on' if c['debug'] else 'off'}"
        )
        out.print("measurements accepted:")
        for name in _RECEIPT_MEASUREMENTS.get(c["tee"], ()):
            if name in c["measurements"]:
                out.print(f"  {name} {escape(str(c['measurements'][name]))}")
        for broker, gpus in sorted((r.get("gpus") or {}).items()):
            for i, g in enumerate(gpus):
                out.print(
                    f"GPU {i} (verified by broker {escape(broker)} at the release):"
                    f" {escape(str(g.get('arch')))} {escape(str(g.get('ueid')))}, driver"
                    f" {escape(str(g.get('driver_version')))}, VBIOS"
                    f" {escape(str(g.get('vbios_version')))}, CC {escape(str(g.get('cc_mode')))},"
                    f" root {escape(str(g.get('root')))}"
                )
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
    if failure is not None:
        raise ShieldError(failure.message.removeprefix(f"{file}: "))


def _log_verifier(text: str) -> NoteVerifier:
    if "+" not in text or Path(text).is_file():
        text = Path(text).read_text().strip()
    return NoteVerifier.parse(text)


COMMANDS = (run, job, receipt)
