"""The container images: deploy/containers/Containerfile.{broker,runner}, checked statically.

Building them takes minutes (a Debian root filesystem with mmdebstrap, the wheels, podman
build) and needs root, mmdebstrap and podman, so CI checks the files instead and ``make images``
(scripts/build_images.py) builds and smoke-checks the images; ``SHIELDML_BUILD_IMAGES=1`` runs
that build here as a test. What the static checks hold the files to: the base is the documented
Debian root filesystem (no registry image, so no unpinned tag), the image runs as a non-root
user, no secret is baked in, the entrypoint is a real shieldml command, and the image names are
the ones the Kubernetes manifests run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import click
import pytest

from shieldml.cli import cli

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "deploy" / "containers"
K8S = ROOT / "deploy" / "kubernetes"
SECRETISH = re.compile(r"(?i)(pass(word)?|secret|token|kek|private|credential|api[_-]?key)")


def _build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_images", ROOT / "scripts" / "build_images.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


IMAGES = _build_script().IMAGES


def instructions(path: Path) -> list[tuple[str, str]]:
    """A Containerfile as (INSTRUCTION, arguments), continuation lines joined, comments out."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _command_exists(argv: list[str]) -> bool:
    """Whether ``argv`` (``shieldml`` and subcommand words) names a real command of the CLI."""
    if not argv or argv[0] != "shieldml":
        return False
    cmd: click.Command = cli
    for word in argv[1:]:
        if word.startswith("-"):
            break
        if not isinstance(cmd, click.Group):
            break
        sub = cmd.get_command(click.Context(cmd), word)  # the top level loads commands lazily
        if sub is None:
            return False
        cmd = sub
    return not isinstance(cmd, click.Group)


def _k8s_containers() -> list[dict[str, object]]:
    yaml = pytest.importorskip("yaml")
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            stack = [doc]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    if "image" in node and "name" in node:
                        found.append(node)
                    stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)
    return found


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_containerfile_base_is_the_documented_rootfs(image: str):
    steps = instructions(CONTAINERS / IMAGES[image][0])
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    froms = [a for w, a in steps if w == "FROM"]
    assert froms, "no FROM"
    for base in froms:
        ref = args.get(base.strip("${}"), base) if base.startswith("$") else base
        # a registry tag could change under the same name: only the local Debian rootfs (which
        # the build script references by digest) or a digest-pinned image
        assert ref.startswith("localhost/shieldml-base:") or "@sha256:" in ref, ref


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_containerfile_runs_as_a_non_root_user(image: str):
    users = [a for w, a in instructions(CONTAINERS / IMAGES[image][0]) if w == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("0", "root")


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_containerfile_bakes_in_no_secret(image: str):
    path = CONTAINERS / IMAGES[image][0]
    for word, args in instructions(path):
        if word in ("ENV", "ARG", "LABEL"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_.-]*)=", args) or [args.split()[0]]
            assert not any(SECRETISH.search(n) for n in names), (word, args)
        if word in ("COPY", "ADD"):
            sources = shlex.split(args)[:-1]
            assert all(s.rstrip("/") == "wheels" or s.startswith("--from") for s in sources), args
            assert not any(re.search(r"\.(pem|key)$|kek|token", s) for s in sources), args
    assert "ghp_" not in path.read_text() and "BEGIN PRIVATE KEY" not in path.read_text()


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_entrypoint_is_a_real_shieldml_command(image: str):
    steps = instructions(CONTAINERS / IMAGES[image][0])
    entry = [json.loads(a) for w, a in steps if w == "ENTRYPOINT"]
    assert entry and entry[-1] == IMAGES[image][2]
    assert _command_exists(entry[-1]), entry[-1]


def test_image_names_are_the_ones_kubernetes_runs():
    shieldml_images = {str(c["image"]) for c in _k8s_containers() if "shieldml" in str(c["image"])}
    assert shieldml_images == set(IMAGES)
    for c in _k8s_containers():
        command = c.get("command")
        if "shieldml" in str(c["image"]) and isinstance(command, list):
            assert _command_exists([str(x) for x in command]), command
            entry = IMAGES[str(c["image"])][2]
            assert [str(x) for x in command][: len(entry)] == entry


def test_a_made_up_command_is_not_taken_for_a_real_one():
    assert _command_exists(["shieldml", "broker", "serve"])
    assert not _command_exists(["shieldml", "broker", "serv"])
    assert not _command_exists(["shieldml", "broker"])  # a group, not a command
    assert not _command_exists(["python3", "-m", "shieldml"])


@pytest.mark.skipif(
    os.environ.get("SHIELDML_BUILD_IMAGES") != "1",
    reason="building the images takes minutes and needs root, mmdebstrap, podman and a Debian "
    "mirror: `make images`, or SHIELDML_BUILD_IMAGES=1 to run it as this test",
)
def test_images_build_and_pass_their_smoke_check(tmp_path: Path):
    if not (shutil.which("mmdebstrap") and shutil.which("podman")):
        pytest.skip("mmdebstrap and podman are not installed (apt-get install mmdebstrap podman)")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_images.py"),
                        "--work", str(tmp_path)], capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    doc = json.loads(r.stdout)
    assert {i["image"] for i in doc["images"]} == set(IMAGES)
    assert all(i["user"].split(":")[0] == "10001" for i in doc["images"])
