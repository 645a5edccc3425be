"""``shieldml gramine manifest|policy``: SGX with Gramine."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from shieldml.cli._common import EXISTING_FILE
from shieldml.cli._output import out


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
def gramine_manifest_cmd(
    manifest: str, broker_ca: str, secret_prov_port: int, output: str | None
) -> None:
    """Write a Gramine manifest template for the job in MANIFEST."""
    from shieldml.gramine.manifest import gramine_manifest
    from shieldml.runner.manifest import JobManifest

    text = gramine_manifest(
        JobManifest.load(manifest),
        broker_ca=Path(broker_ca).resolve(),
        secret_prov_port=secret_prov_port,
    )
    if output:
        Path(output).write_text(text)
        out.print(
            f"wrote {escape(output)}: render with gramine-manifest, sign with gramine-sgx-sign"
        )
    else:
        click.echo(text, nl=False)


@gramine.command("policy")
@click.argument("sigstruct", type=EXISTING_FILE)
def gramine_policy(sigstruct: str) -> None:
    """Print the policy profile that accepts the enclave signed in SIGSTRUCT (app.sig)."""
    from shieldml.gramine.sigstruct import Sigstruct

    sig = Sigstruct.from_bytes(Path(sigstruct).read_bytes(), sigstruct)
    sig.verify(sigstruct)
    if sig.debug:
        click.echo(
            "# WARNING: this enclave is signed with sgx.debug = true; policies refuse it", err=True
        )
    click.echo(sig.policy_profile(), nl=False)


COMMANDS = (gramine,)
