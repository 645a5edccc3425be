"""The package map of docs/adr/0004-package-layout.md, enforced.

Cloud side (what runs inside the TEE: ``files``, ``attest``, ``policy``, ``runner``, ``gramine``,
``broker`` without ``broker.server``) carries no server stack; private modules (``_name``) are
used only inside their own package; test machinery (``shieldml.testing``) is reached only where a
user asks for the simulated TEE by name; nothing in the library imports the CLI or the demo.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "shieldml"
SERVER_STACK = ("fastapi", "starlette", "pydantic", "uvicorn", "sqlalchemy", "psycopg", "OpenSSL")
CLOUD_SIDE = (
    "files",
    "attest",
    "policy",
    "runner",
    "gramine",
    "broker",
    "errors",
    "serve",
    "client",
)
# who may import shieldml.testing: the simulated TEE is asked for by name there
TESTING_USERS = ("runner.evidence", "runner.gpu", "broker.server.config", "cli", "demo")


def _module(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every module of the library and what it imports, at any depth (lazy imports included)."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        if "digits-job" in path.parts:
            continue
        mod = _module(path)
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
        found[mod] = names
    return found


# who may import whom: a package imports only packages of a lower rank (type-only imports aside)
RANK = {
    "errors": 0,
    "files": 1,
    "attest": 1,
    "broker": 1,
    "policy": 2,
    "testing": 3,
    "client": 3,
    "runner": 4,
    "serve": 5,
    "gramine": 5,
    "broker.server": 5,
    "demo": 6,
    "cli": 7,
}


def _package(mod: str) -> str:
    parts = mod.split(".")[1:]
    if parts[:2] == ["broker", "server"]:
        return "broker.server"
    return "cli" if parts[0] == "cli" or parts[0].startswith("cli_") else parts[0]


def _runtime_imports(path: Path) -> set[str]:
    """What a module imports when it runs: ``if TYPE_CHECKING:`` blocks left out."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return names


def test_packages_import_only_lower_layers():
    bad = []
    for path in SRC.rglob("*.py"):
        mod = _module(path)
        if "digits-job" in path.parts or mod == "shieldml":
            continue
        src = _package(mod)
        for n in _runtime_imports(path):
            if not n.startswith("shieldml.") or _package(n) == src:
                continue
            if RANK[_package(n)] >= RANK[src]:
                bad.append(f"{mod} ({src}) imports {n} ({_package(n)})")
    assert not bad, "\n".join(sorted(bad))


def _within(mod: str, package: str) -> bool:
    return mod == package or mod.startswith(package + ".")


def test_the_map_sees_the_whole_library():
    mods = _imports()
    assert {
        "shieldml.runner.run",
        "shieldml.broker.server.app",
        "shieldml.testing.simulated",
    } <= set(mods)


def test_cloud_side_imports_no_server_stack():
    bad = []
    for mod, names in _imports().items():
        if not any(_within(mod, f"shieldml.{p}") for p in CLOUD_SIDE):
            continue
        if _within(mod, "shieldml.broker.server"):
            continue
        for n in names:
            if n.split(".")[0] in SERVER_STACK or _within(n, "shieldml.broker.server"):
                bad.append(f"{mod} imports {n}")
            if any(_within(n, f"shieldml.{p}") for p in ("cli", "demo")):
                bad.append(f"{mod} imports {n}")
    assert not bad, "\n".join(sorted(bad))


def test_private_modules_stay_inside_their_package():
    """``shieldml.pkg._mod`` is imported only from ``shieldml.pkg``. One exception:
    ``shieldml.testing.simulated`` (and ``simulated_gpu``) build evidence byte for byte from the
    attest parsers' layouts."""
    bad = []
    for mod, names in _imports().items():
        for n in names:
            parts = n.split(".")
            if parts[0] != "shieldml":
                continue
            for i, p in enumerate(parts[1:], 1):
                if p.startswith("_") and not p.startswith("__"):
                    owner = ".".join(parts[:i])
                    if not _within(mod, owner) and not (
                        mod in ("shieldml.testing.simulated", "shieldml.testing.simulated_gpu")
                        and owner == "shieldml.attest"
                    ):
                        bad.append(f"{mod} imports {n}")
                    break
    assert not bad, "\n".join(sorted(set(bad)))


def test_test_machinery_is_reached_only_by_name():
    bad = [
        f"{mod} imports {n}"
        for mod, names in _imports().items()
        for n in names
        if _within(n, "shieldml.testing")
        and not _within(mod, "shieldml.testing")
        and not any(_within(mod, f"shieldml.{u}") for u in TESTING_USERS)
    ]
    assert not bad, "\n".join(sorted(bad))


@pytest.mark.parametrize(
    "what",
    ["shieldml.runner", "shieldml.runner.run", "shieldml.runner.view", "shieldml.broker",
     "shieldml.files", "shieldml.attest", "shieldml.policy", "shieldml.gramine", "shieldml.cli",
     "shieldml.serve", "shieldml.client", "shieldml.client.proxy"],
)  # fmt: skip
def test_importing_the_cloud_side_loads_no_server_stack(what: str):
    """In a fresh interpreter: importing (and, for the runner, resolving its public names) loads
    none of FastAPI, SQLAlchemy, uvicorn, pyOpenSSL."""
    code = (
        f"import sys, importlib; m = importlib.import_module({what!r}); "
        "[getattr(m, n) for n in getattr(m, '__all__', ())]; "
        f"print(sorted(k for k in sys.modules if k.split('.')[0] in {SERVER_STACK!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", out
