"""``shieldml gramine manifest|policy``: SGX with Gramine."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from shieldml.cli._common import EXISTING_FILE, JSON_OPTION, read_bytes
from shieldml.cli._output import emit_json, out
from shieldml.errors import ShieldError


@click.group()
def gramine() -> None:
    """SGX with Gramine: manifests for shieldml jobs, policies from SIGSTRUCTs."""


@gramine.command("manifest")
@click.argument("manifest", type=EXISTING_FILE)
@click.option(
    "--broker-ca",
    required=True,
    type=EXISTING_FILE,
    help="The broker's TLS certificate (PEM).",
)
@click.option("--secret-prov-port", type=int, default=4433, show_default=True)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of standard output."
)
@JSON_OPTION
def gramine_manifest_cmd(
    manifest: str, broker_ca: str, secret_prov_port: int, output: str | None, as_json: bool
) -> None:
    """Write a Gramine manifest template for the job in MANIFEST.

    With --json: ``{"output", "manifest"}`` (the template's text unless written to --output).
    """
    from shieldml.gramine.manifest import gramine_manifest
    from shieldml.runner.manifest import JobManifest

    text = gramine_manifest(
        JobManifest.load(manifest),
        broker_ca=Path(broker_ca).resolve(),
        secret_prov_port=secret_prov_port,
    )
    if output:
        try:
            Path(output).write_text(text)
        except OSError as e:
            raise ShieldError(f"{output}: cannot write the manifest: {e.strerror}") from e
    if as_json:
        emit_json({"output": output, "manifest": None if output else text})
    elif output:
        out.print(
            f"wrote {escape(output)}: render with gramine-manifest, sign with gramine-sgx-sign"
        )
    else:
        click.echo(text, nl=False)


@gramine.command("policy")
@click.argument("sigstruct", type=EXISTING_FILE)
@JSON_OPTION
def gramine_policy(sigstruct: str, as_json: bool) -> None:
    """Print the policy profile that accepts the enclave signed in SIGSTRUCT (app.sig).

    With --json: the enclave's identity and the profile's TOML (``profile``); a debug enclave is
    ``"debug": true`` (policies refuse it).
    """
    from shieldml.gramine.sigstruct import Sigstruct

    sig = Sigstruct.from_bytes(read_bytes(sigstruct, "SIGSTRUCT"), sigstruct)
    sig.verify(sigstruct)
    if as_json:
        emit_json(
            {
                "mrenclave": sig.mrenclave.hex(),
                "mrsigner": sig.mrsigner.hex(),
                "isv_prod_id": sig.isv_prod_id,
                "isv_svn": sig.isv_svn,
                "debug": sig.debug,
                "profile": sig.policy_profile(),
            }
        )
        return
    if sig.debug:
        click.echo(
            "# WARNING: this enclave is signed with sgx.debug = true; policies refuse it", err=True
        )
    click.echo(sig.policy_profile(), nl=False)


COMMANDS = (gramine,)
