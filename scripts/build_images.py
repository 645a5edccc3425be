"""Build the broker and runner container images without a container registry (``make images``).

1. A Debian bookworm root filesystem from Debian's packages (``mmdebstrap --variant=minbase``,
   with python3, python3-venv, ca-certificates), imported into podman's local storage as
   ``localhost/shieldml-base:bookworm``; the Containerfiles build on it by its digest.
2. The wheels of shieldml and its dependencies, from the package index pip is configured with,
   into the build context (the image build then downloads nothing).
3. ``podman build`` (``--isolation chroot``: works where the OCI runtime cannot make
   containers, as inside another container) of ``deploy/containers/Containerfile.{broker,runner}``
   tagged with the names the Kubernetes manifests in ``deploy/kubernetes`` use.
4. A smoke check of each image: its user is not root, its entrypoint is the shieldml command it
   should be, and ``shieldml --version`` runs in its root filesystem.

Needs root (or rootless podman), ``mmdebstrap`` and ``podman``
(``apt-get install mmdebstrap podman``), and a Debian mirror (``--mirror``; default
deb.debian.org). A rootfs from a dated snapshot (``--mirror
http://snapshot.debian.org/archive/debian/20250520T000000Z``) makes the base reproducible.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "deploy" / "containers"
#: the image tag the Kubernetes manifests name (tests/test_containers.py keeps them equal)
TAG = "0.1.0"
#: image name -> (Containerfile, the extras its wheels need, the entrypoint it must have)
IMAGES = {
    f"ghcr.io/example/shieldml-broker:{TAG}": ("Containerfile.broker", "broker",
                                              ["shieldml", "broker", "serve"]),
    f"ghcr.io/example/shieldml-runner:{TAG}": ("Containerfile.runner", "",
                                              ["shieldml", "run"]),
}  # fmt: skip
BASE = "localhost/shieldml-base:bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")


def sh(*cmd: str, capture: bool = False) -> str:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return r.stdout.strip() if capture else ""


def base_image(work: Path, mirror: str) -> str:
    """The Debian root filesystem as a local image; returns its ``name@digest``."""
    rootfs = work / "rootfs.tar"
    sh("mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm",
       str(rootfs), mirror)  # fmt: skip
    sh("podman", "import", str(rootfs), BASE, capture=True)
    rootfs.unlink()
    digest = sh("podman", "image", "inspect", "--format", "{{.Digest}}", BASE, capture=True)
    return f"{BASE.rsplit(':', 1)[0]}@{digest}"


def wheels(context: Path, extras: str) -> None:
    """shieldml and every dependency as wheels in ``context/wheels``."""
    target = f"{ROOT}[{extras}]" if extras else str(ROOT)
    sh(sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(context / "wheels"),
       target)  # fmt: skip


def build(name: str, base: str, work: Path, extras: str) -> None:
    containerfile, need, _ = IMAGES[name]
    context = work / name.rsplit("/", 1)[-1].replace(":", "-")
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    wheels(context, ",".join(x for x in (need, extras) if x))
    args = ["--build-arg", f"EXTRAS={extras}"] if "runner" in name else []
    sh("podman", "build", "--isolation", "chroot", "--pull=never", "--file",
       str(CONTAINERS / containerfile), "--build-arg", f"BASE={base}", *args, "--tag", name,
       str(context))  # fmt: skip
    shutil.rmtree(context)


def smoke(name: str) -> dict[str, object]:
    """What the image says about itself, checked: non-root user, the right entrypoint, and
    ``shieldml --version`` running in its root filesystem (chroot: no OCI runtime needed)."""
    doc = json.loads(sh("podman", "image", "inspect", name, capture=True))[0]
    config = doc.get("Config", {})
    user = str(config.get("User", ""))
    entry = config.get("Entrypoint")
    if user.split(":")[0] in ("", "0", "root"):
        raise SystemExit(f"{name}: runs as root ({user!r})")
    if entry != IMAGES[name][2]:
        raise SystemExit(f"{name}: entrypoint {entry} is not {IMAGES[name][2]}")
    mount = sh("podman", "image", "mount", name, capture=True)
    try:
        version = sh("chroot", mount, "/opt/shieldml/bin/shieldml", "--version", capture=True)
    finally:
        sh("podman", "image", "unmount", name, capture=True)
    return {"image": name, "id": doc["Id"], "user": user, "entrypoint": entry, "version": version}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mirror", default="http://deb.debian.org/debian")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "images")
    ap.add_argument("--extras", default="", help="Extras for the runner image (examples: torch).")
    ap.add_argument("--only", choices=sorted(IMAGES), action="append", help="Build only this.")
    args = ap.parse_args()
    missing = [t for t in ("mmdebstrap", "podman") if shutil.which(t) is None]
    if missing:
        print(f"error: {', '.join(missing)} not found: apt-get install mmdebstrap podman",
              file=sys.stderr)  # fmt: skip
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    base = base_image(args.work, args.mirror)
    results = []
    for name in args.only or sorted(IMAGES):
        build(name, base, args.work, args.extras if "runner" in name else "")
        results.append(smoke(name))
    print(json.dumps({"base": base, "images": results,
                      "seconds": round(time.monotonic() - started, 1)}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
