"""``shieldml demo``: the guided tour."""

from __future__ import annotations

import click

from shieldml.cli._output import out


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep the files here.")
@click.option("--files-only", is_flag=True, help="Only the short tour of protected files.")
def demo(workdir: str | None, files_only: bool) -> None:
    """Two owners, two brokers, confidential training and inference on a simulated TEE."""
    from shieldml.demo import run_demo

    run_demo(out, workdir, files_only=files_only)


COMMANDS = (demo,)
