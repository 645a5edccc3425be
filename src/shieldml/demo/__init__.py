"""``shieldml demo``: the whole story on one machine, with a simulated TEE standing in for hardware.

A model owner and a data owner each run their own key broker (SQLite, loopback, TLS). The data
owner encrypts scikit-learn's bundled digits images; a shielded job trains a small CNN on them and
seals the model to the model owner; a second shielded job classifies the encrypted test images
with the encrypted model and seals the predictions to the data owner, who decrypts them and
scores them. Then the cloud's view (ciphertext, audit logs), three attacks refused, and native vs
shielded times. Everything uses the same commands and code paths as a real deployment, except
that evidence comes from :mod:`shieldml.testing.simulated`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from shieldml.broker.client import BrokerClient
from shieldml.errors import ReleaseDenied, ShieldError
from shieldml.files import decrypt_path, encrypt_file, generate_key
from shieldml.runner.manifest import JobManifest
from shieldml.runner.run import run_job
from shieldml.testing.brokers import BrokerProcess, start_broker

MRENCLAVE = "5e" * 32  # the simulated TEE's measurement of the runner image
SCRIPTS = ("digits_net.py", "train.py", "infer.py")


@dataclass
class Owner:
    name: str
    broker: BrokerProcess

    def client(self) -> BrokerClient:
        return BrokerClient(
            self.broker.url,
            fingerprint=self.broker.fingerprint,
            token=self.broker.token_file.read_text().strip(),
        )


def run_demo(
    console: Console, workdir: str | None = None, *, files_only: bool = False, repeats: int = 3
) -> None:
    """Play the demo; files go to ``workdir`` (kept) or a temporary directory (removed).

    ``repeats``: how many times each job runs natively and shielded, interleaved, for the
    medians of the closing table (1: the runs of the story only)."""
    if files_only:
        from shieldml.demo.files_tour import run_demo as files_tour

        files_tour(console, workdir)
        return
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="shieldml-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        Demo(console, root.resolve(), repeats=repeats).play()
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


class Demo:
    def __init__(self, console: Console, root: Path, *, repeats: int = 3) -> None:
        self.c = console
        self.repeats = max(1, repeats)
        self.root = root
        self.cloud = root / "cloud"  # what the untrusted host stores and runs
        self.work = self.cloud / "work"
        #: seconds of every run: "training native", "training shielded", ... -> one per run
        self.times: dict[str, list[float]] = {}
        self.owners: dict[str, Owner] = {}

    def step(self, title: str) -> None:
        self.c.print()
        self.c.rule(f"[bold]{title}")

    def say(self, text: str) -> None:
        self.c.print(text)

    def play(self) -> None:
        self.c.print(Panel(
            "A model owner and a data owner let an untrusted cloud train and run a model on "
            "their encrypted data. Keys go only to a TEE that proves it runs the approved job.\n"
            "[dim]No TEE here: a simulated platform issues the evidence, and the brokers trust it "
            "only because this demo says so (insecure_allow_simulated).[/dim]",
            title="shieldml demo",
        ))  # fmt: skip
        try:
            self.setup()
            self.train()
            self.infer()
            self.cloud_view()
            self.attacks()
            self.summary()
        finally:
            for o in self.owners.values():
                o.broker.stop()

    # 1 --------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.step("1. Two owners, two key brokers")
        from shieldml.testing.simulated import SimulatedPlatform, system_clock

        self.sim_dir = self.root / "simulated-tee"
        SimulatedPlatform.open(self.sim_dir, clock=system_clock)
        for name in ("model-owner", "data-owner"):
            bp = start_broker(self.root / name, "--simulated-platform", str(self.sim_dir))
            self.owners[name] = Owner(name, bp)
            self.say(f"{name}: broker on {bp.url} (TLS fingerprint {bp.fingerprint[:16]}…)")
        (self.work / "data").mkdir(parents=True)
        for s in SCRIPTS:
            (self.work / s).write_text(
                resources.files("shieldml.demo").joinpath(f"digits-job/{s}").read_text()
            )
        self.keys = {"data": generate_key(), "predictions": generate_key(), "model": generate_key()}
        with self.owners["data-owner"].client() as c:
            c.add_key("data", "stream", self.keys["data"])
            c.add_key("predictions", "stream", self.keys["predictions"])
        with self.owners["model-owner"].client() as c:
            c.add_key("model", "stream", self.keys["model"])
        self.say("keys registered: data owner \\[data, predictions], model owner \\[model]")
        self.prepare_data()
        self.write_jobs()
        self.authorize()

    def prepare_data(self) -> None:
        import torch
        from sklearn.datasets import load_digits  # type: ignore[import-untyped]  # scikit-learn has no stubs

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target)
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(images), generator=g)
        cut = int(len(images) * 0.8)
        self.plain = self.root / "data-owner" / "plain"
        self.plain.mkdir(parents=True)
        torch.save(
            {"images": images[order[:cut]], "labels": labels[order[:cut]]}, self.plain / "train.pt"
        )
        torch.save(images[order[cut:]], self.plain / "test_images.pt")
        self.test_labels = labels[order[cut:]]
        enc = self.cloud / "enc"
        for name in ("train.pt", "test_images.pt"):
            encrypt_file(
                self.plain / name,
                enc / "data" / f"{name}.enc",
                self.keys["data"],
                bind=str(self.work / "data" / name),
            )
        self.say(f"data owner encrypted {cut} training and {len(images) - cut} test images (scikit-learn digits) "
                 "with its key, bound to the paths the job opens")  # fmt: skip

    def manifest(
        self,
        name: str,
        script: str,
        inputs: list[tuple[str, str, str, str]],
        outputs: list[tuple[str, str, str, str]],
        debug: bool = False,
    ) -> Path:
        sha = {
            s: hashlib.sha256((self.work / s).read_bytes()).hexdigest()
            for s in ("digits_net.py", script)
        }
        lines = ["version = 1", 'tee = "simulated"', "", "[command]", f'argv = ["{sys.executable}", "{script}"]', 'cwd = "work"', "",
                 "[env]", 'allow = ["LANG"]', 'set = { OMP_NUM_THREADS = "2" }', ""]  # fmt: skip
        for s, h in sha.items():
            lines += ["[[trusted]]", f'path = "work/{s}"', f'sha256 = "{h}"', ""]
        for o in self.owners.values():
            lines += [
                "[[broker]]",
                f'name = "{o.name}"',
                f'url = "{o.broker.url}"',
                f'fingerprint = "{o.broker.fingerprint}"',
                "",
            ]
        for kind, items in (("input", inputs), ("output", outputs)):
            for path, ct, key, broker in items:
                lines += [
                    f"[[{kind}]]",
                    f'path = "{path}"',
                    f'ciphertext = "{ct}"',
                    f'key = "{key}"',
                    f'broker = "{broker}"',
                    "",
                ]
        lines += [
            "[simulated]",
            f'platform = "{self.sim_dir}"',
            'kind = "sgx"',
            f'mrenclave = "{MRENCLAVE}"',
            f'debug = "{str(debug).lower()}"',
        ]
        target = self.cloud / f"{name}.toml"
        target.write_text("\n".join(lines) + "\n")
        return target

    def write_jobs(self) -> None:
        self.train_job = self.manifest("train", "train.py",
            inputs=[("data/train.pt", "enc/data/train.pt.enc", "data", "data-owner")],
            outputs=[("model/", "enc/model", "model", "model-owner")])  # fmt: skip
        self.infer_job = self.manifest("infer", "infer.py",
            inputs=[("model/", "enc/model", "model", "model-owner"), ("data/test_images.pt", "enc/data/test_images.pt.enc", "data", "data-owner")],
            outputs=[("predictions/", "enc/predictions", "predictions", "data-owner")])  # fmt: skip

    def policy(self, digests: list[str]) -> str:
        profiles = []
        for d in digests:
            profiles.append("\n".join([
                "[[profile]]", 'tee = "sgx"', f'mrenclave = ["{MRENCLAVE}"]', 'mrsigner = "any"', "isv_prod_id = 0",
                "min_isv_svn = 0", f'workload_digest = ["{d}"]', "insecure_allow_simulated = true  # demo only",
            ]))  # fmt: skip
        return "\n\n".join(profiles) + "\n"

    def authorize(self) -> None:
        train_d = JobManifest.load(self.train_job).workload_digest()
        infer_d = JobManifest.load(self.infer_job).workload_digest()
        self.say(f"workload digests: training {train_d[:23]}…, inference {infer_d[:23]}…")
        with self.owners["data-owner"].client() as c:
            c.set_policy("data", self.policy([train_d, infer_d]))
            c.set_policy("predictions", self.policy([infer_d]))
        with self.owners["model-owner"].client() as c:
            c.set_policy("model", self.policy([train_d, infer_d]))
        self.say("policies set: each key only for the approved job(s), on a non-debug TEE")

    # 2, 3 -------------------------------------------------------------------------------------
    def shielded(self, manifest: Path, label: str, *, quiet: bool = False) -> int:
        stats: dict[str, Any] = {}
        with _program_output_hidden() if quiet else contextlib.nullcontext():
            t = time.perf_counter()
            status = run_job(
                manifest,
                stats=stats,
                log=None if quiet else lambda s: self.c.print(f"  [dim]runner:[/dim] {s}"),
            )
            self.times.setdefault(f"{label} shielded", []).append(time.perf_counter() - t)
        return status

    def native(self, script: str, label: str, inputs: dict[str, Path]) -> None:
        self.native_inputs = getattr(self, "native_inputs", {})
        self.native_inputs[label] = (script, inputs)
        d = self.root / "native" / label
        if d.exists():
            shutil.rmtree(d)
        for s in SCRIPTS:
            (d / s).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.work / s, d / s)
        for rel, src in inputs.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, d / rel)
        for out in ("model", "predictions"):
            (d / out).mkdir(exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "2"}  # what the shielded job's manifest sets
        t = time.perf_counter()
        subprocess.run([sys.executable, script], cwd=d, check=True, capture_output=True, env=env)
        self.times.setdefault(f"{label} native", []).append(time.perf_counter() - t)
        self.native_dirs = getattr(self, "native_dirs", {})
        self.native_dirs[label] = d

    def train(self) -> None:
        self.step("2. Confidential training in the cloud")
        self.say("$ shieldml run -m train.toml")
        assert_ok(self.shielded(self.train_job, "training"))
        self.say(
            "the trained model left the TEE sealed to the model owner's key: cloud/enc/model/model.pt"
        )
        self.native("train.py", "training", {"data/train.pt": self.plain / "train.pt"})

    def infer(self) -> None:
        import torch

        self.step("3. Confidential inference")
        self.say("$ shieldml run -m infer.toml")
        assert_ok(self.shielded(self.infer_job, "inference"))
        out = self.root / "data-owner" / "results"
        decrypt_path(
            self.cloud / "enc" / "predictions",
            out,
            self.keys["predictions"],
            bind=str(self.work / "predictions"),
            overwrite=True,
        )
        preds = torch.load(out / "predictions.pt", weights_only=True)
        self.accuracy = float((preds == self.test_labels).float().mean())
        self.say(
            f"data owner decrypts the predictions: accuracy [bold]{self.accuracy:.1%}[/bold] on {len(preds)} test images"
        )
        model_plain = self.root / "model-owner" / "model"
        decrypt_path(
            self.cloud / "enc" / "model",
            model_plain,
            self.keys["model"],
            bind=str(self.work / "model"),
            overwrite=True,
        )
        self.native(
            "infer.py",
            "inference",
            {
                "model/model.pt": model_plain / "model.pt",
                "data/test_images.pt": self.plain / "test_images.pt",
            },
        )

    # 4 --------------------------------------------------------------------------------------
    def cloud_view(self) -> None:
        self.step("4. What the cloud sees")
        table = Table("file on the host", "bytes", "first bytes")
        for p in sorted(self.cloud.rglob("*")):
            if (
                p.is_file()
                and p.suffix != ".toml"
                and "work" not in p.relative_to(self.cloud).parts[:1]
            ):
                table.add_row(
                    str(p.relative_to(self.cloud)), str(p.stat().st_size), p.read_bytes()[:16].hex()
                )
        self.c.print(table)
        left = sorted(str(p.relative_to(self.work)) for p in self.work.rglob("*") if p.is_file())
        self.say(
            f"the job's directory on the host holds only its scripts ({', '.join(left)}): the "
            "program ran in a private root in TEE memory, holding the measured copies of the "
            "scripts and the decrypted files; no mount point is left on the host to swap"
        )
        markers = [bytes(self.plain.joinpath("train.pt").read_bytes()[-64:])]
        leaked = [
            p
            for p in self.cloud.rglob("*")
            if p.is_file() and any(m in p.read_bytes() for m in markers)
        ]
        self.say(
            "scan of every host file for plaintext: "
            + ("[green]none found[/green]" if not leaked else f"[red]{leaked}[/red]")
        )
        from shieldml.broker.audit import verify_log
        from shieldml.errors import AuditChainError

        for o in self.owners.values():
            with o.client() as c:
                raw, head = c.audit_all()
            try:
                verify_log(raw, head)
                ok, why = True, ""
            except AuditChainError as e:
                ok, why = False, e.message
            released = sum(1 for r in raw if r["event"] == "release" and r["data"].get("allowed"))
            self.say(
                f"{o.name} audit log: {len(raw)} records, {released} releases, chain {'[green]intact[/green]' if ok else '[red]BROKEN: ' + why + '[/red]'}"
            )

    # 5 --------------------------------------------------------------------------------------
    def attacks(self) -> None:
        self.step("5. Three attacks")
        script = self.work / "train.py"
        original = script.read_text()
        try:  # a) the operator edits the training script and the manifest to match
            script.write_text(
                original + "\nopen('/tmp/stolen', 'wb').write(open('data/train.pt', 'rb').read())\n"
            )
            evil = self.manifest(
                "train-evil",
                "train.py",
                inputs=[("data/train.pt", "enc/data/train.pt.enc", "data", "data-owner")],
                outputs=[("model/", "enc/model", "model", "model-owner")],
            )
            self.attack("a modified training script", lambda: run_job(evil))
        finally:
            script.write_text(original)
        model = self.cloud / "enc" / "model" / "model.pt"
        backup = model.read_bytes()
        try:  # b) the host flips one bit of the encrypted model
            raw = bytearray(backup)
            raw[len(raw) // 2] ^= 1
            model.write_bytes(bytes(raw))
            self.attack("a tampered model file", lambda: run_job(self.infer_job))
        finally:
            model.write_bytes(backup)
        debug = self.cloud / "infer-debug.toml"  # the approved job, on a TEE launched in debug mode
        debug.write_text(self.infer_job.read_text().replace('debug = "false"', 'debug = "true"'))
        self.attack("a debug TEE (its memory readable by the host)", lambda: run_job(debug))

    def attack(self, what: str, action: Any) -> None:
        try:
            action()
        except ReleaseDenied as e:
            names: set[str] = set()
            for v in e.verdicts:  # per key, the closest profile
                fails: list[list[str]] = [
                    [str(c["name"]) for c in p.get("checks", []) if not c.get("passed")]
                    for p in v.get("profiles", [])
                ]
                if fails:
                    fewest = min(len(f) for f in fails)
                    names.update(next(f for f in fails if len(f) == fewest))
            self.say(
                f"[green]✓ refused[/green] {what}: the broker's verdict fails [bold]{', '.join(sorted(names))}[/bold]"
            )
            return
        except ShieldError as e:
            self.say(f"[green]✓ refused[/green] {what}: {e.message.splitlines()[0]}")
            return
        self.say(f"[red]✗ {what}: NOT refused[/red]")

    # 6 --------------------------------------------------------------------------------------
    def summary(self) -> None:
        self.step("6. Native vs shielded")
        jobs = {"training": self.train_job, "inference": self.infer_job}
        if self.repeats > 1:
            self.say(
                f"timing {self.repeats} runs of each job, natively and shielded, interleaved "
                "(the first were those above)"
            )
        for round_ in range(1, self.repeats):
            for job, manifest in jobs.items():
                script, inputs = self.native_inputs[job]
                # alternate which goes first, so that a drift in the machine's load cancels
                if round_ % 2:
                    assert_ok(self.shielded(manifest, job, quiet=True))
                    self.native(script, job, inputs)
                else:
                    self.native(script, job, inputs)
                    assert_ok(self.shielded(manifest, job, quiet=True))
        table = Table("job", "native (s)", "shielded (s)", "difference")
        noisy = False
        for job in jobs:
            n, s = self.times[f"{job} native"], self.times[f"{job} shielded"]
            spread = noise(n, s)
            table.add_row(
                job,
                f"{statistics.median(n):.2f}",
                f"{statistics.median(s):.2f}",
                overhead_text(statistics.median(n), statistics.median(s), spread),
            )
            noisy = noisy or within_noise(statistics.median(n), statistics.median(s), spread)
        self.c.print(table)
        how = (
            f"medians of {self.repeats} interleaved runs each"
            if self.repeats > 1
            else "one run each (--repeats N for medians of N interleaved runs)"
        )
        self.c.print(
            f"[dim]{how}; the difference is attestation, key release, decryption, sealing and "
            "process start"
            + (
                "; 'within noise': smaller than the spread between runs of the same job"
                if noisy
                else ""
            )
            + "[/dim]"
        )
        self.c.print(
            Panel(
                f"accuracy {self.accuracy:.1%}; every attack refused; no plaintext outside the TEE",
                title="done",
            )
        )


#: with one run of each, below this share of the native time (or 0.2 s) no difference shows
NOISE_SHARE = 0.10


def noise(native: list[float], shielded: list[float]) -> float | None:
    """The spread between runs of the same job (the larger of the two ranges), or ``None`` with
    fewer than two runs of each."""
    if len(native) < 2 or len(shielded) < 2:
        return None
    return max(max(native) - min(native), max(shielded) - min(shielded))


def within_noise(native: float, shielded: float, spread: float | None = None) -> bool:
    """Whether the difference is smaller than what changes between runs: the measured ``spread``
    when there is one, else :data:`NOISE_SHARE` of the native time (at least 0.2 s)."""
    floor = max(0.2, NOISE_SHARE * native) if spread is None else max(spread, 0.05)
    return abs(shielded - native) < floor


def overhead_text(native: float, shielded: float, spread: float | None = None) -> str:
    """The difference as a signed number (never "+-"), and "within noise" when it is."""
    d = shielded - native
    text = ("+" if d >= 0 else "\N{MINUS SIGN}") + f"{abs(d):.2f} s"
    if within_noise(native, shielded, spread):
        return text + " (within noise)"
    if d < 0:
        return text + " (shielded faster: load changed between the runs)"
    return text + f" ({d / native:+.0%})"


@contextlib.contextmanager
def _program_output_hidden() -> Iterator[None]:
    """The timing runs' program output (which the runner passes through) kept off the screen."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with Path(os.devnull).open("wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def assert_ok(status: int) -> None:
    # The root class on purpose: the job's own program failed, which no library call treats as an
    # error (run_job returns the status); only the demo's story stops here.
    if status != 0:
        raise ShieldError(f"the shielded job exited with {status}")
