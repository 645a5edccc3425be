"""Generate docs/cli.md from the click command tree (``make docs``; a test keeps it current)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from shieldml.cli import EXIT_CODES, cli


def render() -> str:
    lines = [
        "# CLI reference",
        "",
        "Generated from the code by `scripts/gen_cli_docs.py`; do not edit by hand.",
        "",
        "## Exit codes",
        "",
        "Every command exits with one of these (`shieldml run`: with the exit code of its job).",
        "",
        "| code | meaning |",
        "| --- | --- |",
        *(f"| {code} | {meaning} |" for code, meaning in EXIT_CODES.items()),
        "",
    ]

    def walk(cmd: click.Command, path: list[str]) -> None:
        ctx = click.Context(cmd, info_name=" ".join(path), terminal_width=88, max_content_width=88)
        if path != ["shieldml"] or not isinstance(cmd, click.Group):
            lines.append(f"## `{' '.join(path)}`")
            lines.append("")
            lines.append("```")
            lines.append(
                cmd.get_help(ctx)
                .replace(" ".join(path[:-1]) + " " + path[-1], " ".join(path), 1)
                .rstrip()
            )
            lines.append("```")
            lines.append("")
        if isinstance(cmd, click.Group):
            for name in sorted(cmd.list_commands(ctx)):
                sub = cmd.get_command(ctx, name)
                if sub is not None:
                    walk(sub, [*path, name])

    walk(cli, ["shieldml"])
    return "\n".join(lines)


def main() -> int:
    target = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    text = render()
    if "--check" in sys.argv:
        return 0 if target.exists() and target.read_text() == text else 1
    target.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
