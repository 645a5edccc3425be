"""``shieldml demo``: the guided tour."""

from __future__ import annotations

import click

from shieldml.cli._output import out


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep the files here.")
@click.option("--files-only", is_flag=True, help="Only the short tour of protected files.")
def demo(workdir: str | None, files_only: bool) -> None:
    """Two owners, two brokers, confidential training and inference on a simulated TEE."""
    import importlib.util

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

    run_demo(out, workdir, files_only=files_only)


COMMANDS = (demo,)
