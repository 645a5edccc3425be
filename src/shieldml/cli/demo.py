"""``shieldml demo``: the guided tour."""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape

from shieldml.cli._output import out


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep the files here.")
@click.option("--files-only", is_flag=True, help="Only the short tour of protected files.")
@click.option(
    "--repeats",
    type=click.IntRange(1, 20),
    default=3,
    show_default=True,
    help="Runs of each job, native and shielded, interleaved, for the closing table's medians.",
)
@click.option(
    "--quickstart-files",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Only write docs/quickstart.md's sample files (model.pt, infer.py) into DIR.",
)
def demo(workdir: str | None, files_only: bool, repeats: int, quickstart_files: str | None) -> None:
    """Two owners, two brokers, confidential training and inference on a simulated TEE.

    Takes about a minute on two quiet cores (--repeats 1: about 25 s); --files-only a few seconds.
    """
    import importlib.util

    if quickstart_files is not None:
        from shieldml.demo.quickstart import write_quickstart_files

        for p in write_quickstart_files(quickstart_files):
            out.print(f"wrote {escape(str(p))}")
        return
    from shieldml.demo import run_demo
    from shieldml.errors import ShieldError

    if not files_only:
        missing = [
            m for m in ("torch", "sklearn", "fastapi") if importlib.util.find_spec(m) is None
        ]
        if missing:
            raise ShieldError(
                f"the demo needs {', '.join(missing)}, which this Python does not have",
                hint="pip install 'shieldml[broker,examples]' (or `make demo` in a clone); "
                "`shieldml demo --files-only` runs without them",
            )

    # lines fit the terminal: rich wraps them (the CLI's own console leaves that to the terminal)
    console = Console(highlight=False)
    run_demo(console, workdir, files_only=files_only, repeats=repeats)


COMMANDS = (demo,)
