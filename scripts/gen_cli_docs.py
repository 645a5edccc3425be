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
        "Every command exits with one of these. `shieldml run` exits with the exit code of its",
        "program, or with 125 (`--runner-exit-code N`) when the runner itself failed: a refusal,",
        "an error, a usage error, an interruption before the program started; never with 1, 2, 3",
        "or 130 of its own.",
        "",
        "| code | meaning |",
        "| --- | --- |",
        *(f"| {code} | {meaning} |" for code, meaning in EXIT_CODES.items()),
        "",
        "## JSON output",
        "",
        "With `--json`, a command prints its result as one JSON document on standard output (a",
        "verdict it reports, such as `attest verify` finding evidence not genuine, is a result:",
        "exit 1 with the verdict on standard output). An error (anything main() turns into an exit",
        "code: bad input, a refusal by a broker, an integrity failure, a usage error) is one JSON",
        "object on one line of standard error, the last line written there:",
        "",
        "```",
        '{"ok": false, "error": "<message>", "kind": "error|integrity|usage|interrupted",',
        ' "type": "<exception class>", "hint": "<fix or null>", "exit_code": N, "details": {...}}',
        "```",
        "",
        "`details` holds what the error carries by its parts: a broker's `status` and `audit_seq`;",
        "for a policy refusal `failed_checks` (`key`, `profile`, `tee`, `check`, `expected`,",
        "`found`, `hint`, or `key` and `reason`) and the broker's `verdicts`; for evidence that",
        "is not genuine `failed_check`, `message`, `expected`, `found`, `hint` and every check",
        "run (`checks`); for an integrity failure `path` and `where`.",
        "",
        "`shieldml run --json` writes no progress lines; standard output stays the program's. Its",
        'report is one JSON object on the last line of standard error: `{"ok": true,',
        '"exit_code", "workload_digest", "brokers": {name: {"keys", "audit_seq"}}, "receipt"}`,',
        "or the error object above (`exit_code` 125). After `--`, `--json` is the program's.",
        "",
        "## Standard streams",
        "",
        "Standard output carries a command's result (its text, or its JSON with `--json`);",
        "standard error carries errors, `warning:` lines (an old spelling such as `--tee",
        "gramine`), `insecure:` notes and progress bars (shown on a terminal only, after a",
        "second). Where standard output carries data instead, the report moves to standard error:",
        "`encrypt`/`decrypt` with OUT `-` (as one JSON line with `--json`). `shieldml run`",
        "passes the program's standard output, standard error and exit code through; its own",
        "progress lines (`shieldml: ...`) are written to standard output between the program's",
        "lines, and with `--json` there are none and its report is the last line of standard",
        "error. `broker serve --json` prints one JSON line once it listens and nothing else on",
        "standard output.",
        "",
        "## Shell completion",
        "",
        "Commands, options and choices complete in bash, zsh and fish. Generate the script once",
        "and source it from the shell's start-up file:",
        "",
        "```sh",
        "_SHIELDML_COMPLETE=bash_source shieldml > ~/.shieldml-complete.bash   # bash >= 4.4",
        "echo '. ~/.shieldml-complete.bash' >> ~/.bashrc",
        "_SHIELDML_COMPLETE=zsh_source shieldml > ~/.shieldml-complete.zsh     # zsh",
        "echo '. ~/.shieldml-complete.zsh' >> ~/.zshrc",
        "_SHIELDML_COMPLETE=fish_source shieldml > ~/.config/fish/completions/shieldml.fish",
        "```",
        "",
        "The variable is read by the `shieldml` console script (click's completion: the name is",
        "`_<PROG>_COMPLETE` for the program's name in capitals), so `python -m shieldml.cli`",
        "does not complete; regenerate the script after upgrading shieldml.",
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
