"""``shieldml demo``: the guided tour."""

from __future__ import annotations

import click
from rich.markup import escape

from shieldml.cli._output import out


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep the files here.")
@click.option("--files-only", is_flag=True, help="Only the short tour of protected files.")
@click.option(
    "--quickstart-files",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Only write docs/quickstart.md's sample files (model.pt, infer.py) into DIR.",
)
def demo(workdir: str | None, files_only: bool, quickstart_files: str | None) -> None:
    """Two owners, two brokers, confidential training and inference on a simulated TEE."""
    if quickstart_files is not None:
        from shieldml.demo.quickstart import write_quickstart_files

        for p in write_quickstart_files(quickstart_files):
            out.print(f"wrote {escape(str(p))}")
        return
    from shieldml.demo import run_demo

    run_demo(out, workdir, files_only=files_only)


COMMANDS = (demo,)
