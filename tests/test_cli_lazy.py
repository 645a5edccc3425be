"""The CLI loads a command's module only when that command runs: ``shieldml run`` (started in
the TEE before every job) imports neither the broker's server stack nor what other commands
need. The table of commands is checked against the modules that define them."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import shieldml.cli
from shieldml.cli import COMMAND_MODULES, cli


def test_every_command_of_every_cli_module_is_in_the_table():
    found = {}
    for info in pkgutil.iter_modules(shieldml.cli.__path__):
        if info.name.startswith("_"):  # __main__ runs the CLI; _common, _output define none
            continue
        module = importlib.import_module(f"shieldml.cli.{info.name}")
        for command in getattr(module, "COMMANDS", ()):
            found[command.name] = info.name
    assert found == COMMAND_MODULES
    ctx = cli.make_context("shieldml", [], resilient_parsing=True)
    assert all(cli.get_command(ctx, name) is not None for name in COMMAND_MODULES)
    assert cli.get_command(ctx, "no-such-command") is None


def test_shieldml_run_loads_no_server_stack_and_no_other_command():
    probe = (
        "import sys\n"
        "from shieldml.cli import main\n"
        "try:\n"
        "    main(['run', '-m', '/nonexistent.toml'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "import shieldml.runner.run\n"
        "bad = ('fastapi', 'uvicorn', 'sqlalchemy', 'starlette', 'prometheus_client',\n"
        "       'shieldml.broker.server', 'shieldml.cli.attest', 'shieldml.cli.broker',\n"
        "       'shieldml.cli.demo', 'importlib.metadata')\n"
        "print(sorted(m for m in sys.modules if m.startswith(bad)))\n"
    )
    assert _printed_by(probe)[-1] == "[]"


def test_the_cli_and_the_runner_load_no_verifier_until_one_is_used():
    """``shieldml run`` starts the decrypted view once ``shieldml.runner.run`` is loaded: what is
    loaded before that delays every job. TEE names come from ``shieldml.attest._tee`` alone;
    the verifiers, the policy code and the HTTP client load when a command uses them."""
    probe = (
        "import sys\n"
        "import shieldml.cli, shieldml.cli.run, shieldml.runner.run\n"
        "bad = ('shieldml.attest._intel_verify', 'shieldml.attest._snp', 'shieldml.attest._nvidia',\n"
        "       'shieldml.attest._trust', 'shieldml.policy', 'cryptography.x509', 'httpx')\n"
        "print(sorted(m for m in sys.modules if m.startswith(bad)))\n"
        "from shieldml.attest import verify_evidence\n"
        "print('shieldml.attest._evidence' in sys.modules)\n"
    )
    assert _printed_by(probe) == ["[]", "True"]


def _printed_by(probe: str) -> list[str]:
    """The lines a fresh interpreter running ``probe`` prints (nothing imported before it)."""
    return (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()
    )
