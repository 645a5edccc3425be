"""The decrypted view: a private mount namespace, and a private root the program runs in.

Runs as its own process (``python -I``: :func:`shieldml.runner.run.view_command`; cwd ``/``, no
inherited environment), started by the runner first thing; on a pipe (never on disk) it gets the
job's plan with the measured bytes of the trusted files once the runner measured the job, and
the keys last, once the brokers released them. It

 1. leaves the host's mount namespace (``unshare``; as root, or in an unprivileged user namespace
    where the kernel allows it) and makes every mount private, so nothing propagates back;
 2. lays out the program's private root on a tmpfs (:func:`build_root`): the job's directories
    hold only the trusted files, written from the bytes that were measured, and the protected
    paths; the directories on the way to them are tmpfs too, with the host's other entries
    bound in (the interpreter, its libraries, ``/proc``, ``/dev``). No mount point is an entry in
    a host directory, so the host cannot detach one by unlinking or replacing it;
 3. mounts a tmpfs for every protected directory (a protected file is bind-mounted from a tmpfs
    staging area), copies every input's ciphertext into the staging tmpfs and hashes the copy
    (no key needed: meanwhile the runner asks the brokers), then, with the keys, decrypts the
    inputs from those copies in parallel and makes them read-only;
 4. starts the program in a mount namespace of its own rooted at the private root
    (``pivot_root``), forwards signals to it, waits; a ``[serve]`` job's program also gets a
    network namespace of its own, which only :func:`_connector` reaches (``shieldml serve``);
 5. checks that every mount it made is still in place (mount ids), then seals every output,
    read through a descriptor of the staging tmpfs, into its ciphertext location (atomically)
    and reports their digests.

New entries the program makes in directories on the way to the job (``/tmp``, say) stay in the
private root and vanish with it. If the runner dies, this process and the program die with it
(``PR_SET_PDEATHSIG``), the namespace goes away, and with it every tmpfs: plaintext never
reaches a disk.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shieldml.errors import (
    IntegrityError,
    MountChangedError,
    RollbackError,
    ShieldError,
    ViewError,
)

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
EXIT_VIEW_FAILED = 70

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise ViewError(
            f"{what}: {os.strerror(err)}",
            hint="the runner needs root, or unprivileged user namespaces (kernel.unprivileged_userns_clone=1)",
        )


def die_with_parent() -> None:
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def enter_private_namespace() -> None:
    """A mount namespace of our own, with no propagation to the host."""
    if os.geteuid() == 0:
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    else:
        uid, gid = os.getuid(), os.getgid()
        _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare(CLONE_NEWUSER|CLONE_NEWNS)")
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")


def _mount(
    src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _check(
        _libc.mount(
            src.encode() if src else None,
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def tmpfs(target: str, mode: str = "0700") -> None:
    _mount("shieldml", target, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode}")


def bind(src: str, target: str, *, readonly: bool, recursive: bool = False) -> None:
    _mount(src, target, None, MS_BIND | (MS_REC if recursive else 0))
    if readonly:  # the top mount only: submounts of a recursive bind keep their own flags
        _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)


def remount_readonly(target: str) -> None:
    _mount(None, target, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


MNT_DETACH = 2
# where programs write scratch data (PyTorch's DataLoader and NCCL use /dev/shm): fresh tmpfs in
# the private root unless the job lives there; the host's own are not shown
SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")  # noqa: S108 - replaced by fresh tmpfs, never used
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}


def _create(path: str, mode: int = 0o600, data: bytes = b"") -> None:
    """A new regular file (never an existing entry, never through a symbolic link)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def build_root(root: str, plan: dict[str, Any], *, exclude: set[str]) -> None:
    """Lay out the program's private root in the empty tmpfs ``root``.

    The job's directories (the manifest's directory and below, the working directory, the
    directories of trusted files) hold only the trusted files, as the bytes that were measured,
    and the protected paths' mount points. Every other directory on the way to them is made in
    the tmpfs too, with the host's other entries bound into it, so the interpreter, its libraries,
    ``/proc`` and ``/dev`` are where the program expects them.
    """
    base = plan["base"]  # as the runner resolved it when it measured, never resolved again
    trusted = plan.get("trusted", [])
    measured = {plan["cwd"]} | {os.path.dirname(t["path"]) for t in trusted}
    protected = {i["path"].rstrip("/") for i in plan["inputs"] + plan["outputs"]}
    tips = (
        measured | {os.path.dirname(p) for p in protected} | {os.path.dirname(d) for d in SCRATCH}
    )
    need: set[str] = set()
    for d in tips:
        while d not in need:
            need.add(d)
            if d == "/":
                break
            d = os.path.dirname(d)

    def inside(d: str, top: str) -> bool:
        return d == top or d.startswith(top.rstrip("/") + "/")

    private = {d for d in need if d in measured or inside(d, base)}
    for d in sorted(need, key=len):
        if d != "/":
            os.makedirs(root + d, mode=0o755, exist_ok=True)
    # scratch directories the program may write plaintext to are fresh tmpfs, never the host's
    scratch = [d for d in SCRATCH if d not in need]
    for d in scratch:
        os.mkdir(root + d, 0o1777)
        tmpfs(root + d, mode="1777")
    skip = need | protected | exclude | set(scratch)
    for d in sorted(need - private, key=len):
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        for name in entries:
            host = os.path.join(d, name)
            if host in skip:
                continue
            _replicate(host, root + host)
    for t in trusted:
        _create(root + t["path"], t["mode"] & 0o555 | 0o400, base64.b64decode(t["data"]))


def _replicate(host: str, target: str) -> None:
    """The host's entry at the same path in the private root: a read-only bind mount (its own
    submounts, such as /dev/pts, keep their flags), or the same symbolic link."""
    try:
        st = os.lstat(host)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(host), target)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(target, 0o755)
            bind(host, target, readonly=True, recursive=True)
        else:
            _create(target)
            bind(host, target, readonly=True)
    except (OSError, ViewError):
        pass  # the host removed it meanwhile (or it cannot be bound): then it is not there


SIOCSIFFLAGS = 0x8914
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40


def loopback_up() -> None:
    """Bring up ``lo`` in a fresh network namespace (it starts down)."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifr = struct.pack("16sH14x", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING)
        fcntl.ioctl(sock, SIOCSIFFLAGS, ifr)


def _enter_root(root: str, cwd: str, *, private_network: bool = False) -> Any:
    """preexec_fn: a mount namespace of the program's own, rooted at ``root`` (pivot_root); with
    ``private_network`` a network namespace of its own too, holding only its loopback."""
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)

    def enter() -> None:
        die_with_parent()
        if number is None:
            raise OSError(f"pivot_root: unknown system call number on {os.uname().machine}")
        if private_network:
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            loopback_up()
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
        os.chdir(root)
        _check(_libc.syscall(number, b".", b"."), "pivot_root")
        _check(_libc.umount2(b".", MNT_DETACH), "umount the host's root")
        os.chdir(cwd)

    return enter


def _clear_stale_partials(ciphertext: str) -> None:
    """Temporary files of earlier runs that were killed while sealing (never valid outputs)."""
    target = Path(ciphertext.rstrip("/"))
    candidates = list(target.parent.glob(f".{target.name}.*.partial"))
    if target.is_dir():
        candidates += list(target.rglob(".*.partial"))
    for p in candidates:
        p.unlink(missing_ok=True)


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are written as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_ids() -> dict[str, int]:
    """Mount point -> id of the topmost mount there, in this process's mount namespace."""
    out: dict[str, int] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        out[_unescape(fields[4])] = int(fields[0])  # later lines are mounted on top
    return out


def check_mounts(made: dict[str, int]) -> None:
    """Every mount the view made is still there: the host can detach a mount by unlinking or
    replacing its mount point from its own namespace, and the program then reads and writes host
    files. Raises ViewError naming each path that changed."""
    now = mount_ids()
    changed = sorted(p for p, mid in made.items() if now.get(p) != mid)
    if changed:
        raise MountChangedError(
            f"{', '.join(changed)}: the protected mount was removed or replaced while the "
            "program ran (the host changed the mount point); nothing was sealed",
            hint="whatever the program wrote there may have reached the host's disk",
        )


@contextlib.contextmanager
def open_tree(root: str) -> Iterator[dict[str, int]]:
    """Every regular file under ``root``, opened once: ``relative path -> descriptor``.

    Directories are walked by descriptor (``O_NOFOLLOW``, ``dir_fd``), so a component swapped for a
    symbolic link is refused rather than followed; a symbolic link or special file in the tree
    is refused (ViewError). The caller hashes and reads only these descriptors: a file replaced
    by path after the walk is never read.
    """
    fds: dict[str, int] = {}
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC

    def walk(dir_fd: int, prefix: str) -> None:
        for name in sorted(os.listdir(dir_fd)):
            rel = f"{prefix}{name}"
            try:
                fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=dir_fd)
            except OSError as e:
                raise ViewError(f"{root}/{rel}: {e.strerror} (symbolic links are refused)") from e
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                try:
                    walk(fd, rel + "/")
                finally:
                    os.close(fd)
            elif stat.S_ISREG(st.st_mode):
                fds[rel] = fd
            else:
                os.close(fd)
                raise ViewError(f"{root}/{rel}: not a regular file")

    try:
        top = os.open(root, flags | os.O_DIRECTORY)
        try:
            walk(top, "")
        finally:
            os.close(top)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def copy_tree_hashing(tree: dict[str, int], copy_to: str) -> dict[str, str]:
    """Copy every file of an :func:`open_tree` to ``copy_to`` (same relative paths); the
    :func:`shieldml.runner.manifest.tree_sha256` map of exactly the bytes copied."""
    digests = {}
    for rel, fd in tree.items():
        dst = os.path.join(copy_to, rel)
        os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
        digests[rel] = _copy_hashing(fd, dst)
    return digests


def publish_hashing(private: str, dst: str) -> dict[str, str]:
    """Copy the sealed file or tree ``private`` (in the staging tmpfs) to the host path ``dst``,
    all or nothing; the :func:`~shieldml.runner.manifest.tree_sha256` map of the bytes copied.

    The receipt states these digests: they are of what the TEE wrote, never of what the host's
    path holds afterwards (the host can put an older sealed output there at any moment)."""
    from shieldml.files import Outputs

    single = not os.path.isdir(private)
    rels = [""] if single else sorted(_files_under(private))
    digests = {}
    with Outputs(overwrite=True) as outputs:
        for rel in rels:
            src = private if single else os.path.join(private, rel)
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                with outputs.file(dst if single else os.path.join(dst, rel)) as out:
                    h = hashlib.sha256()
                    while chunk := os.read(fd, 1 << 20):
                        h.update(chunk)
                        out.write(chunk)
                    digests[rel] = h.hexdigest()
            finally:
                os.close(fd)
    return digests


def _new_file(dst: str) -> int:
    return os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _copy_through_buffer(fd: int, out: int, offset: int, h: Any = None) -> None:
    """Copy ``fd`` from ``offset`` to its end onto ``out``, feeding ``h`` (a hash) the bytes."""
    while chunk := os.pread(fd, 1 << 20, offset):
        if h is not None:
            h.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view) :]
        offset += len(chunk)


def _copy_hashing(fd: int, dst: str) -> str:
    """Copy the file open at ``fd`` (from offset 0) to the new file ``dst``; SHA-256 of the bytes."""
    h = hashlib.sha256()
    out = _new_file(dst)
    try:
        _copy_through_buffer(fd, out, 0, h)
    finally:
        os.close(out)
    return h.hexdigest()


def _copy(fd: int, dst: str) -> None:
    """Copy the file open at ``fd`` (from offset 0) to the new file ``dst``, in the kernel
    (``sendfile``) where it can, else through a buffer."""
    out = _new_file(dst)
    try:
        offset = 0
        try:
            while n := os.sendfile(out, fd, offset, 1 << 30):
                offset += n
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) or offset:
                raise
            _copy_through_buffer(fd, out, offset)
    finally:
        os.close(out)


def _sha256_of(path: str) -> str:
    """SHA-256 of a file of the staging tmpfs (our own copy: nobody else can change it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with open(fd, "rb", closefd=False) as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    finally:
        os.close(fd)


def _files_under(d: str) -> list[str]:
    return [
        os.path.relpath(os.path.join(top, n), d) for top, _dirs, names in os.walk(d) for n in names
    ]


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


TMPFS_MAGIC = 0x01021994


def _fs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(128)  # struct statfs; f_type is its first field (a long)
    _check(_libc.fstatfs(fd, buf), "fstatfs")
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], sys.byteorder)


def private_stage() -> str:
    """A fresh tmpfs, made the working directory; returns its path (for messages and checks).

    Made without trusting any path afterwards: the tmpfs is mounted on a child of a directory we
    hold open, then entered by descriptor (no symbolic link followed) and checked to be a new
    mount (another device than its parent) of a tmpfs, and empty. A host that swaps the path in
    between gets a refusal, not our plaintext.
    """
    parent = os.path.realpath(tempfile.mkdtemp(prefix="shieldml-view-"))
    try:
        _make_stage(parent)
    except BaseException:
        remove_stage(f"{parent}/s")  # what was made of it, the host's directory included
        raise
    return f"{parent}/s"


def _make_stage(parent: str) -> None:
    pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.mkdir("s", 0o700, dir_fd=pfd)
        os.fchdir(pfd)
        tmpfs("s")
        sfd = os.open("s", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            fresh = (
                os.fstat(sfd).st_dev != os.fstat(pfd).st_dev
                and _fs_type(sfd) == TMPFS_MAGIC
                and not os.listdir(sfd)
            )
            if not fresh:
                raise ViewError(f"{parent}/s: the staging tmpfs was replaced while it was made")
            os.fchdir(sfd)
        finally:
            os.close(sfd)
    finally:
        os.close(pfd)


def remove_stage(stage: str) -> None:
    """Best effort at exit: unmount the staging tmpfs and remove its (empty) directories."""
    os.chdir("/")
    _libc.umount2(stage.encode(), MNT_DETACH)  # not mounted (an early failure): nothing done
    for d in (stage, os.path.dirname(stage)):  # each on its own: one may not have been made
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _tree_size(path: str) -> int:
    p = Path(path)
    return (
        sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        if p.is_dir()
        else p.stat().st_size
    )


def run_view(
    plan: dict[str, Any],
    result_fd: int,
    receive_keys: Callable[[], dict[tuple[str, str], bytes]],
) -> int:
    """Everything inside the namespace; returns the program's exit status. ``receive_keys``
    blocks until the runner sends the keys the brokers released (it raises
    :class:`KeysWithheldError` if the runner closes the pipe instead: a refusal, an interruption)."""
    die_with_parent()
    enter_private_namespace()  # while single-threaded: a user namespace can only be entered so
    # The runner's abort (SIGTERM: KeysWithheldError) waits while the stage is made, so that it
    # lands where the stage is removed again; the process has one thread here, so no other
    # thread can take the signal meanwhile.
    abort = {signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, abort)
    stage: str | None = None
    try:
        # Everything from here on is relative to the staging tmpfs, the working directory: a
        # path the host could detach and refill (the stage's own, or /proc/self/fd/N) is never
        # used again.
        stage = private_stage()
        # What decrypting and sealing need loads on another thread (in this namespace, SIGTERM
        # blocked there for good) while this one lays out the private root and copies the
        # ciphertexts (the kernel's work, no lock held).
        threading.Thread(target=_preload, name="shieldml-view-preload", daemon=True).start()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, abort)  # an abort already sent lands here
        return _run_staged(plan, result_fd, stage, receive_keys)
    finally:  # a refusal too: no empty staging directory is left on the host
        signal.pthread_sigmask(signal.SIG_UNBLOCK, abort)
        if stage is not None:
            remove_stage(stage)


class KeysWithheldError(ShieldError):
    """The runner closed the view's input without sending keys: nothing is decrypted."""


@contextlib.contextmanager
def _named_as(item: dict[str, Any], copy: str) -> Iterator[None]:
    """An error about our private copy names the host's file it was copied from."""
    try:
        yield
    except ShieldError as e:
        if e.message.startswith(copy):
            e.message = item["ciphertext"].rstrip("/") + e.message[len(copy) :]
            e.args = (e.message,)
        if isinstance(e, IntegrityError) and "is bound to path" in e.message:
            e.hint = (
                "a protected file opens only at the path it was encrypted for: if this is the "
                "file meant, the input's bind in the job manifest names that path (it is "
                "measured: the owners approve it), or `shieldml rebind` re-encrypts it for "
                f"{item['bind']}"
            )
        raise


def _stage_input(
    item: dict[str, Any], copy: str, hasher: ThreadPoolExecutor
) -> Future[dict[str, str]]:
    """Copy an input's ciphertext (a file, or a directory's files, each read by descriptor)
    into the staging tmpfs at ``copy``; its :func:`~shieldml.runner.manifest.tree_sha256` map,
    computed from the copy, as a future (a file is hashed while the runner waits for its keys
    and the view decrypts)."""
    if os.path.isdir(item["ciphertext"]):
        with open_tree(item["ciphertext"]) as tree:
            digests = copy_tree_hashing(tree, copy)
        done: Future[dict[str, str]] = Future()
        done.set_result(digests)
        return done
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    fd = os.open(item["ciphertext"], flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device: refused
            raise ViewError(f"{item['ciphertext']}: not a regular file")
        _copy(fd, copy)
    finally:
        os.close(fd)
    return hasher.submit(lambda: {"": _sha256_of(copy)})


def _run_staged(
    plan: dict[str, Any],
    result_fd: int,
    stage: str,
    receive_keys: Callable[[], dict[tuple[str, str], bytes]],
) -> int:
    root = "root"
    os.mkdir(root, 0o755)
    tmpfs(root, mode="0755")
    n_in = len(plan["inputs"])
    t_root = time.perf_counter()
    build_root(root, plan, exclude={os.path.dirname(stage)})
    root_s = time.perf_counter() - t_root
    files: list[tuple[dict[str, Any], str]] = []  # (item, where its plaintext lives)
    for i, item in enumerate(plan["inputs"] + plan["outputs"]):
        is_dir = item["path"].endswith("/")
        target = root + item["path"].rstrip("/")
        if is_dir:
            os.makedirs(target, mode=0o700, exist_ok=True)
            tmpfs(target)
            files.append((item, target))
        else:
            _create(target)
            staged = f"f{i}"
            _create(staged)
            files.append((item, staged))

    # Before the keys come (the runner asks the brokers meanwhile): every input's ciphertext is
    # copied into the staging tmpfs, which the host cannot change, and hashed from there; the
    # digests (and the pins) are of exactly the bytes decrypted from those copies afterwards.
    hasher = ThreadPoolExecutor(max(1, min(8, n_in)))
    copies: list[tuple[str, Future[dict[str, str]]]] = []
    t_copy = time.perf_counter()
    try:
        for k, (item, _where) in enumerate(files[:n_in]):
            with _named_as(item, f"c{k}"):
                copies.append((f"c{k}", _stage_input(item, f"c{k}", hasher)))
        copy_s = time.perf_counter() - t_copy
        keys = receive_keys()  # blocks until the brokers answered (the runner sends them)
        t0 = time.perf_counter()
        # loaded by _preload while the ciphertexts were copied
        from shieldml.files import (
            Format,
            atomic_output,
            decrypt_path,
            encrypt_path,
            generate_key,
            key_id,
        )
        from shieldml.runner.manifest import combined_digest
        from shieldml.runner.recipient import seal_key, sealed_key_path

        def decrypt(k: int) -> None:
            item, where = files[k]
            copy, hashed = copies[k]
            bound = item["bind"]  # the in-TEE path, or the manifest's bind (measured)
            with _named_as(item, copy):
                failure: ShieldError | None = None
                try:
                    if os.path.isdir(copy):
                        for rel in sorted(_files_under(copy)):
                            dst = os.path.join(where, rel)
                            Path(dst).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                            decrypt_path(
                                os.path.join(copy, rel),
                                dst,
                                keys[_ref(item)],
                                bind=f"{bound}/{rel}",
                                overwrite=True,
                            )
                    else:
                        decrypt_path(copy, where, keys[_ref(item)], bind=bound, overwrite=True)
                except ShieldError as e:
                    failure = e
                digests = hashed.result()
                pin = item.get("sha256")
                if pin is not None and combined_digest(digests) != pin:  # wins over others
                    raise RollbackError(item["ciphertext"], pin)
                if failure is not None:
                    raise failure
                input_digests[k] = digests

        input_digests: dict[int, dict[str, str]] = {}
        # Decrypt before bind-mounting: a bind mount pins the inode, and decryption replaces
        # the staged file atomically (new inode).
        with ThreadPoolExecutor(max(1, min(8, n_in))) as pool:
            list(pool.map(decrypt, range(n_in)))  # the first failure (named file) propagates
    finally:
        hasher.shutdown(wait=True, cancel_futures=True)
        for copy, _hashed in copies:
            _remove(copy)
    decrypt_s = time.perf_counter() - t0
    decrypted = sum(_tree_size(where) for _, where in files[:n_in])
    for k, (item, where) in enumerate(files):
        target = root + item["path"].rstrip("/")
        readonly = k < n_in
        if item["path"].endswith("/"):
            if readonly:
                remount_readonly(target)
        else:
            bind(where, target, readonly=readonly)
    ids = mount_ids()
    points = [stage, f"{stage}/{root}"] + [
        f"{stage}/{root}{i['path'].rstrip('/')}" for i, _ in files
    ]
    made = {p: ids.get(p, -1) for p in points}
    t1 = time.perf_counter()
    status = _run_program(plan, root)
    program_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    check_mounts(made)
    sealed: list[dict[str, Any]] = []
    for item, where in files[n_in:]:
        _clear_stale_partials(item["ciphertext"])
        fmt = item.get("format", "stream")
        key = keys.get(_ref(item))
        entry: dict[str, Any] = {}
        if not item.get("recipient"):
            entry["sealed_by"] = {"broker": item["broker"], "key": item["key"]}
        if item.get("recipient"):  # a fresh key, sealed to the recipient, written first
            key = generate_key(Format(fmt))
            sealed_key = seal_key(
                base64.b64decode(item["recipient"]), item["path"].rstrip("/"), key
            )
            with atomic_output(sealed_key_path(item["ciphertext"]), overwrite=True) as f:
                f.write(sealed_key)
            entry["sealed_key_sha256"] = hashlib.sha256(sealed_key).hexdigest()
        if key is None:
            raise ViewError(f"no key for output {item['path']}")
        if "sealed_by" in entry:
            entry["sealed_by"]["key_id"] = key_id(key).hex()  # as `shieldml inspect` shows it
        private = f"s{len(sealed)}"  # sealed in the staging tmpfs, hashed, then published
        encrypt_path(where, private, key, bind=item["bind"], fmt=Format(fmt))
        try:
            digests = publish_hashing(private, item["ciphertext"])
        finally:
            _remove(private)
        sealed.append(
            {
                "path": item["path"],
                "ciphertext": item["ciphertext"],
                "bind": item["bind"],
                "sha256": digests,
                **entry,
            }
        )
    times = {
        "root_s": root_s,
        "copy_s": copy_s,
        "decrypt_s": decrypt_s,
        "decrypted_bytes": decrypted,
        "program_s": program_s,
        "seal_s": time.perf_counter() - t2,
    }
    inputs = [
        {
            "path": item["path"],
            "ciphertext": item["ciphertext"],
            "bind": item["bind"],
            "sha256": input_digests[k],
        }
        for k, (item, _where) in enumerate(files[:n_in])
    ]
    os.write(
        result_fd,
        json.dumps(
            {"status": status, "inputs": inputs, "outputs": sealed, "times": times}
        ).encode(),
    )
    return status


def _ref(item: dict[str, Any]) -> tuple[str, str]:
    return (str(item["broker"]), str(item["key"]))


def _run_program(plan: dict[str, Any], root: str) -> int:
    # argv comes from the measured manifest: it is what the owners approved. The program gets a
    # mount namespace of its own whose root is the private root: the host's directories beside
    # the job are there (bound), the job's own directories hold only the measured copies and the
    # protected paths, and no mount point is an entry the host can unlink.
    serve = plan.get("serve")
    try:
        proc = subprocess.Popen(
            plan["argv"],
            env=plan["env"],
            preexec_fn=_enter_root(root, plan["cwd"], private_network=serve is not None),
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise ViewError(f"could not start {plan['argv'][0]} in the private root: {e}") from e
    if serve is not None:  # shieldml serve: connections into the program's own loopback
        import threading

        threading.Thread(
            target=_connector,
            args=(proc.pid, int(serve["channel_fd"]), int(serve["port"])),
            daemon=True,
        ).start()

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, forward)
    rc = proc.wait()
    return rc if rc >= 0 else 128 - rc


SYS_SETNS = {"x86_64": 308, "aarch64": 268}


def _connector(pid: int, channel_fd: int, port: int) -> None:
    """``shieldml serve``: the program runs in a network namespace of its own, which nothing
    outside the view can reach. This thread enters it (``setns`` applies to the calling thread
    only) and, for each byte the runner sends on ``channel_fd`` (a Unix SOCK_SEQPACKET pair), opens
    a TCP connection to ``127.0.0.1:port`` there and hands the runner its descriptor
    (SCM_RIGHTS), or answers ``b"E"`` with the reason."""
    import array
    import socket

    channel = socket.socket(fileno=channel_fd)
    try:
        ns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            number = SYS_SETNS.get(os.uname().machine)
            if number is None or _libc.syscall(number, ns, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                channel.send(b"E setns: " + os.strerror(err).encode())
                return
        finally:
            os.close(ns)
        while channel.recv(16):
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            except OSError as e:
                with contextlib.suppress(OSError):
                    channel.send(b"E " + (e.strerror or str(e)).encode())
                continue
            with conn:
                fds = array.array("i", [conn.fileno()])
                channel.sendmsg([b"C"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
    except OSError:
        return
    finally:
        channel.close()


def _withheld(_signum: int, _frame: object) -> None:
    raise KeysWithheldError("the runner ended the view before sending keys")


def _keys_from(stream: Any) -> Callable[[], dict[tuple[str, str], bytes]]:
    """The runner's second line: the released keys, each its owner's (broker, name), never a
    bare name another broker could also answer for."""

    def receive() -> dict[tuple[str, str], bytes]:
        line = stream.readline()
        if not line:
            raise KeysWithheldError("the runner sent no keys (a refusal or an interruption)")
        # the program may start now: Ctrl-C and the operator's signals are its, and ours again
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_DFL)
        return {(k["broker"], k["name"]): base64.b64decode(k["key"]) for k in json.loads(line)}

    return receive


def _preload() -> None:
    """Import what :func:`_run_staged` needs once the keys come (an import another thread asks
    for meanwhile waits for this one; one that fails here is raised again there)."""
    with contextlib.suppress(Exception):
        import shieldml.files
        import shieldml.runner.manifest
        import shieldml.runner.recipient  # noqa: F401


def main() -> int:
    try:
        return _main()
    finally:
        # the interpreter's last garbage collection walks every object of every module loaded
        # (tens of ms, which the runner waits for); nothing left needs it
        import gc

        gc.freeze()


def _main() -> int:
    # Started before the brokers answer: until the keys come, a Ctrl-C is the runner's to
    # handle, and SIGTERM (the runner's abort) ends us at once, staging directory removed.
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _withheld)
    stdin = sys.stdin.buffer
    try:
        line = stdin.readline()  # the plan (no key), once the runner measured the job
    except KeysWithheldError:
        return EXIT_VIEW_FAILED
    if not line:  # the runner stopped before (a bad manifest, trusted files that differ)
        return EXIT_VIEW_FAILED
    plan = json.loads(line)
    result_fd = int(plan["result_fd"])
    try:
        return run_view(plan, result_fd, _keys_from(stdin))
    except ShieldError as e:
        doc = {
            "error": e.diagnostics(),
            "kind": type(e).__name__,
            "started": isinstance(e, MountChangedError),
        }
        with contextlib.suppress(BrokenPipeError):  # the runner aborted: nobody reads it
            os.write(result_fd, json.dumps(doc).encode())
        return EXIT_VIEW_FAILED


if __name__ == "__main__":
    sys.exit(main())
