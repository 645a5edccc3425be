"""Red team of ``verify_receipt`` with a GPU policy (55ebf27, e11faca, 79b286c): the CPU part of
the policy on the receipt's evidence, the GPUs the receipt lists (per broker, as that broker
verified them at the release) against the matched profile's ``[profile.gpu]``
(``listed_gpu_problems``); ``receipt verify`` in the CLI; ``job init --gpus N``; a read-only
simulated platform directory (dae8384).

Receipts here are written as the runner writes them (``provider_for`` + ``bind_workload`` +
``write_receipt`` of a ``job init --tee simulated --gpus N`` manifest): genuine evidence from the
pinned simulated TDX VM, binding the body. Each ``gpus`` list stands for what a broker's answer
put there. An attack that succeeds is ``xfail(strict=True)`` with the reason."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shieldml.attest import TrustAnchors, fingerprint
from shieldml.cli import main
from shieldml.errors import InputReadError, ReceiptError, UntrustedRootError
from shieldml.policy import Policy, listed_gpu_problems
from shieldml.runner.evidence import provider_for
from shieldml.runner.job_policy import policy_from_job
from shieldml.runner.manifest import JobManifest
from shieldml.runner.receipt import VerifiedReceipt, verify_receipt, write_receipt
from shieldml.runner.run import run_job
from shieldml.testing.simulated import SimulatedPlatform, system_clock
from shieldml.testing.simulated_gpu import SimulatedGpu, open_gpus

VBIOS_RIM = "NV_GPU_VBIOS_1010_0200_882_96009F0001"
DRIVER_RIM = "NV_GPU_DRIVER_GH100_550.90.07"


def summary(ueid: str, **changes: Any) -> dict[str, Any]:
    """A GPU as a broker's answer lists it (``GpuClaims.summary`` of a simulated Hopper)."""
    g: dict[str, Any] = {
        "arch": "hopper",
        "ueid": ueid,
        "hwmodel": "GH100 A01 GSP BROM",
        "driver_version": "550.90.07",
        "vbios_version": "96.00.9F.00.01",
        "rim_ids": [VBIOS_RIM, DRIVER_RIM],
        "rim_kinds": ["driver", "vbios"],
        "measurements_matched": True,
        "cc_mode": "on",
        "root": "simulated",
    }
    g.update(changes)
    return g


class Made:
    def __init__(self, d: Path, gpus: int) -> None:
        self.dir = d
        (d / "app.py").write_text("print('hello')\n")
        self.platform = d / "sp"
        rc = main(
            ["job", "init", str(d / "app.py"), "--tee", "simulated", "--gpus", str(gpus),
             "--simulated-platform", str(self.platform), "-o", str(d / "job.toml")]
        )  # fmt: skip
        assert rc == 0
        self.manifest = JobManifest.load(d / "job.toml")
        self.policy_text = policy_from_job(self.manifest).text
        self.trust = SimulatedPlatform.open(self.platform, clock=system_clock).trust()

    def receipt(
        self,
        *,
        audit: dict[str, int],
        gpus: dict[str, list[dict[str, Any]]] | None,
        name: str = "receipt.json",
    ) -> str:
        """A receipt as the runner writes it, from the job's simulated TDX VM."""
        m = self.manifest
        digest = m.workload_digest()
        t = m.tdx_settings
        provider = provider_for(m.tee, m.simulated, base=m.base, rtmr=t.rtmr, extend=t.extend)
        binding = provider.bind_workload(digest)
        path = self.dir / name
        write_receipt(
            str(path), digest=digest, audit=audit, result={"inputs": [], "outputs": []},
            gpus=gpus, status=0, started=datetime.now(UTC), provider=provider, binding=binding,
        )  # fmt: skip
        return str(path)

    def verify(self, path: str, policy: str | None = None) -> VerifiedReceipt:
        pol = Policy.from_toml(policy if policy is not None else self.policy_text)
        return verify_receipt(path, policy=pol, trust=self.trust)

    def problems(self, path: str, policy: str | None = None) -> list[str]:
        with pytest.raises(ReceiptError, match="do not meet the policy") as e:
            self.verify(path, policy)
        return e.value.problems


@pytest.fixture
def made(tmp_path: Path) -> Made:
    return Made(tmp_path, 2)


def two(**changes: Any) -> list[dict[str, Any]]:
    return [summary("1001", **changes), summary("1002", **changes)]


def profiles(*texts: str) -> str:
    """A policy of the given ``[[profile]]`` blocks."""
    return "version = 1\n\n" + "\n".join(texts)


def profile_block(policy_text: str) -> str:
    return policy_text[policy_text.index("[[profile]]") :]


# -- the GPUs a receipt lists against [profile.gpu] -------------------------------------------


def test_receipt_of_two_good_gpus_is_accepted(made: Made):
    """The baseline the attacks below change one thing of."""
    v = made.verify(made.receipt(audit={"owner": 1}, gpus={"owner": two()}))
    assert v.verdict.matched == 1 and v.body["gpus"]["owner"][1]["ueid"] == "1002"


def test_gpu_policy_refuses_a_receipt_no_broker_released_to(made: Made):
    path = made.receipt(audit={}, gpus=None)
    try:
        made.verify(path)
    except ReceiptError as e:  # the GPU requirement refused: defended
        assert e.gpus and e.problems == [
            "no broker verified any GPU (the run released no key); the policy requires 2"
        ]
        return
    raise AssertionError("a count = 2 GPU policy accepted a receipt listing no GPU at all")


@pytest.mark.skipif(os.geteuid() != 0, reason="the decrypted view needs root here")
def test_host_turns_cc_off_for_a_job_without_broker_keys_and_the_receipt_is_refused(
    tmp_path: Path,
):
    made = Made(tmp_path, 1)
    text = (tmp_path / "job.toml").read_text()
    assert 'gpus = "1"' in text
    # [simulated] is the hardware, not the workload: the host changes it (not in the digest)
    (tmp_path / "job.toml").write_text(text.replace('gpus = "1"', 'gpus = "1"\ngpu_cc = "off"'))
    receipt = str(tmp_path / "run.receipt")
    assert run_job(tmp_path / "job.toml", receipt=str(receipt)) == 0
    body = json.loads(Path(receipt).read_text())["receipt"]
    assert body["broker_audit_seq"] == {} and "gpus" not in body
    try:
        made.verify(receipt)
    except ReceiptError as e:
        assert e.gpus and e.problems[0].startswith("no broker verified any GPU")
        return
    raise AssertionError("a receipt of a run with CC off met [profile.gpu]")


def test_gpus_named_for_a_broker_that_released_nothing_do_not_count(made: Made):
    path = made.receipt(audit={"owner": 3}, gpus={"other": two()})
    assert made.problems(path) == ["broker owner: 0 GPU(s) listed, the policy requires 2"]


def test_every_releasing_broker_must_list_the_gpus(made: Made):
    """A second broker (the other owner's) whose answer listed nothing for the GPUs."""
    path = made.receipt(audit={"owner": 3, "second": 7}, gpus={"owner": two()})
    assert made.problems(path) == ["broker second: 0 GPU(s) listed, the policy requires 2"]


def test_one_gpu_listed_twice_is_a_problem(made: Made):
    path = made.receipt(audit={"owner": 1}, gpus={"owner": [summary("1001"), summary("1001")]})
    assert made.problems(path) == ["broker owner: GPU 1: the same GPU as GPU 0"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"cc_mode": "ON"}, "CC mode 'ON'"),
        ({"cc_mode": "devtools"}, "CC mode 'devtools'"),
        ({"cc_mode": None}, "CC mode None"),
        ({"root": "VENDOR"}, "root 'VENDOR' not accepted"),
        ({"root": None}, "root None not accepted"),
        ({"driver_version": "550.90.07 "}, "driver '550.90.07 ' not approved"),
        ({"driver_version": None}, "driver None not approved"),
        ({"vbios_version": " 96.00.9F.00.01"}, "VBIOS ' 96.00.9F.00.01' not approved"),
        ({"rim_ids": []}, "RIMs []"),
        ({"rim_ids": None}, "RIMs None"),
    ],
)
def test_case_whitespace_and_none_in_listed_gpus_are_problems(
    made: Made, change: dict[str, Any], problem: str
):
    path = made.receipt(
        audit={"owner": 1}, gpus={"owner": [summary("1001"), summary("1002", **change)]}
    )
    (found,) = made.problems(path)  # one problem, naming what is off (RIMs: then what is needed)
    assert found == f"broker owner: GPU 1: {problem}" or (
        problem.startswith("RIMs ") and found.startswith(f"broker owner: GPU 1: {problem} (")
    )


def test_lowercase_vbios_is_the_same_version(made: Made):
    """Versions compare case-insensitively, as the broker's check does (no false refusal)."""
    v = made.verify(
        made.receipt(audit={"owner": 1}, gpus={"owner": two(vbios_version="96.00.9f.00.01")})
    )
    assert v.verdict.matched == 1


def test_arch_pinned_by_the_policy_refuses_other_spellings_and_none(made: Made):
    pinned = made.policy_text.replace(
        "rim_required = true", 'arch = ["hopper"], rim_required = true'
    )
    assert 'arch = ["hopper"]' in pinned
    gpus = [summary("1001", arch="Hopper"), summary("1002", arch=None)]
    path = made.receipt(audit={"owner": 1}, gpus={"owner": gpus})
    assert made.problems(path, pinned) == [
        "broker owner: GPU 0: architecture 'Hopper'",
        "broker owner: GPU 1: architecture None",
    ]


def test_missing_driver_passes_only_for_an_nvswitch(made: Made):
    gpus = [
        summary("1001", arch="nvswitch", driver_version=None),
        summary("1002", arch=None, driver_version=None),
    ]
    path = made.receipt(audit={"owner": 1}, gpus={"owner": gpus})
    assert made.problems(path) == ["broker owner: GPU 1: driver None not approved"]


def test_rim_ids_outside_the_pinned_set_are_refused(made: Made):
    pinned = made.policy_text.replace(
        "rim_required = true", f'rim_ids = ["{VBIOS_RIM}", "{DRIVER_RIM}"], rim_required = true'
    )
    gpus = [summary("1001"), summary("1002", rim_ids=[VBIOS_RIM, "NV_GPU_DRIVER_GH100_535.1"])]
    path = made.receipt(audit={"owner": 1}, gpus={"owner": gpus})
    (found,) = made.problems(path, pinned)
    assert found.startswith(
        f"broker owner: GPU 1: RIMs {[VBIOS_RIM, 'NV_GPU_DRIVER_GH100_535.1']!r}"
    )


def test_only_a_vbios_rim_listed_does_not_meet_rim_required(made: Made):
    gpus = two(rim_ids=[VBIOS_RIM], rim_kinds=["vbios"])
    path = made.receipt(audit={"owner": 1}, gpus={"owner": gpus})
    try:
        made.verify(path)
    except ReceiptError as e:
        assert e.problems and all(
            p.endswith("the policy requires driver and vbios RIMs matched") for p in e.problems
        )
        return
    raise AssertionError("a GPU without a driver RIM met rim_required = true")


def test_unhashable_root_in_a_listed_gpu_is_a_problem_not_a_crash(made: Made):
    profile = Policy.from_toml(made.policy_text).profiles[0]
    problems = listed_gpu_problems(
        profile, {"owner": [summary("1001"), summary("1002", root=["vendor"])]}, {"owner": 1}
    )
    assert problems == ["broker owner: GPU 1: root ['vendor'] not accepted"]


@pytest.mark.parametrize(
    ("listed", "brokers", "problem"),
    [
        ("not a dict", {"owner": 1}, "broker owner: 0 GPU(s) listed, the policy requires 2"),
        ({"owner": "two"}, {"owner": 1}, "broker owner: 0 GPU(s) listed, the policy requires 2"),
        ({"owner": [1, 2]}, {"owner": 1}, "broker owner: GPU 0: not a GPU record"),
    ],
)
def test_malformed_listed_gpus_are_problems(listed: Any, brokers: Any, problem: str, made: Made):
    profile = Policy.from_toml(made.policy_text).profiles[0]
    assert listed_gpu_problems(profile, listed, brokers)[0] == problem


# -- several profiles: which one is matched ---------------------------------------------------


def test_a_cpu_only_profile_first_accepts_the_receipt_as_the_broker_would(made: Made):
    """By design: a policy with a CPU-only profile the evidence meets does not require GPUs
    (the broker releases under it too); the verdict says which profile accepted."""
    gpu_block = profile_block(made.policy_text)
    cpu_only = "\n".join(ln for ln in gpu_block.splitlines() if not ln.startswith("gpu ="))
    path = made.receipt(audit={"owner": 1}, gpus={"owner": two(cc_mode="off")})
    v = made.verify(path, profiles(cpu_only, gpu_block))
    assert v.verdict.matched == 1 and v.verdict.allowed


def test_a_cpu_only_profile_of_another_workload_does_not_rescue_bad_gpus(made: Made):
    gpu_block = profile_block(made.policy_text)
    digest = made.manifest.workload_digest()
    cpu_only = "\n".join(ln for ln in gpu_block.splitlines() if not ln.startswith("gpu ="))
    other = cpu_only.replace(digest, "sha256:" + "ab" * 32)
    path = made.receipt(audit={"owner": 1}, gpus={"owner": two(cc_mode="off")})
    problems = made.problems(path, profiles(other, gpu_block))
    assert problems == [f"broker owner: GPU {i}: CC mode 'off'" for i in (0, 1)]


def test_a_gpu_profile_first_does_not_hide_the_later_profile_the_gpus_meet(made: Made):
    block = profile_block(made.policy_text)
    three = block.replace("count = 2,", "count = 3,")
    v = made.verify(made.receipt(audit={"owner": 1}, gpus={"owner": two()}), profiles(three, block))
    assert v.verdict.matched == 2


# -- receipt verify in the CLI ----------------------------------------------------------------


def test_cli_receipt_verify_json_with_gpu_problems_exits_1_and_lists_them(
    made: Made, capsys: pytest.CaptureFixture[str]
):
    path = made.receipt(audit={"owner": 1}, gpus={"owner": two(cc_mode="devtools")})
    (made.dir / "policy.toml").write_text(made.policy_text)
    rc = main(["receipt", "verify", path, "--policy", str(made.dir / "policy.toml"),
               "--simulated-platform", str(made.platform), "--json"])  # fmt: skip
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1 and doc["ok"] is False
    assert doc["problems"] == [f"broker owner: GPU {i}: CC mode 'devtools'" for i in (0, 1)]


def test_cli_receipt_verify_with_gpu_problems_names_the_gpus_not_the_files(
    made: Made, capsys: pytest.CaptureFixture[str]
):
    path = made.receipt(audit={"owner": 1}, gpus={"owner": two(cc_mode="devtools")})
    (made.dir / "policy.toml").write_text(made.policy_text)
    rc = main(["receipt", "verify", path, "--policy", str(made.dir / "policy.toml"),
               "--simulated-platform", str(made.platform)])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 1
    assert "files no longer match" not in cap.err, cap.err
    assert "the GPUs it lists do not meet the policy's [profile.gpu]" in cap.err
    assert "CPU evidence accepted (its GPUs are not: below) by profile 1" in cap.out


def test_cli_receipt_verify_prints_listed_gpu_fields_escaped(
    made: Made, capsys: pytest.CaptureFixture[str]
):
    """A broker's hwmodel/ueid text with rich markup is shown as text (printable ASCII passes
    the client's check, so markup can reach a receipt)."""
    gpus = [summary("1001"), summary("1002")]
    path = made.receipt(audit={"[bold]owner[/bold]": 1}, gpus={"[bold]owner[/bold]": gpus})
    (made.dir / "policy.toml").write_text(made.policy_text)
    rc = main(["receipt", "verify", path, "--policy", str(made.dir / "policy.toml"),
               "--simulated-platform", str(made.platform)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "GPU 1 (verified by broker [bold]owner[/bold] at the release): hopper 1002" in out


# -- job init --gpus --------------------------------------------------------------------------


@pytest.mark.parametrize("tee", ["sgx", "gramine", "ratls"])
def test_job_init_gpus_with_any_sgx_spelling_is_a_usage_error(tmp_path: Path, tee: str):
    (tmp_path / "app.py").write_text("print(1)\n")
    rc = main(["job", "init", str(tmp_path / "app.py"), "--tee", tee, "--gpus", "1",
               "-o", str(tmp_path / "job.toml")])  # fmt: skip
    assert rc == 2 and not (tmp_path / "job.toml").exists()


@pytest.mark.parametrize("n", ["0", "17", "-1", "2.0"])
def test_job_init_gpus_out_of_range_is_a_usage_error(tmp_path: Path, n: str):
    (tmp_path / "app.py").write_text("print(1)\n")
    rc = main(["job", "init", str(tmp_path / "app.py"), "--tee", "simulated", "--gpus", n,
               "--simulated-platform", str(tmp_path / "sp"), "-o", str(tmp_path / "job.toml")])  # fmt: skip
    assert rc == 2 and not (tmp_path / "job.toml").exists()


def test_job_init_gpus_writes_a_tdx_vm_and_a_policy_that_pins_the_count(tmp_path: Path):
    made = Made(tmp_path, 3)
    assert made.manifest.simulated["kind"] == "tdx" and made.manifest.simulated["gpus"] == "3"
    assert made.manifest.gpu is not None
    assert "gpu = { count = 3," in made.policy_text and "rim_required = true" in made.policy_text


# -- a read-only simulated platform directory -------------------------------------------------


def _read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> tuple[int, str]:
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def test_read_only_platform_trusts_no_gpu_root_and_its_gpus_are_not_genuine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from shieldml.attest import load_gpu_chain, verify_gpu_evidence
    from shieldml.broker.server.config import BrokerConfig

    d = tmp_path / "ro"
    SimulatedPlatform.open(d, clock=system_clock)
    _read_only(monkeypatch)
    cfg = BrokerConfig(database="sqlite://", state_dir=str(tmp_path), simulated_platforms=(str(d),))
    anchors = cfg.trust(announce=False)
    # the runner (the directory writable on its side) then makes this platform's family: the
    # anchors the broker took hold no GPU root, so its GPUs are not genuine there
    monkeypatch.undo()
    made = open_gpus(d, clock=system_clock)[0]
    nonce = bytes(32)
    with pytest.raises(UntrustedRootError):
        verify_gpu_evidence(
            made.report(nonce), load_gpu_chain(made.chain_pem()),
            now=datetime.now(UTC), trust=anchors, nonce=nonce,
        )  # fmt: skip
    assert fingerprint(made.root) not in anchors.simulated
    # the control: anchors taken now that the family exists trust it
    again = cfg.trust(announce=False)
    assert fingerprint(made.root) in again.simulated
    claims = verify_gpu_evidence(
        made.report(nonce), load_gpu_chain(made.chain_pem()),
        now=datetime.now(UTC), trust=again, nonce=nonce,
    )  # fmt: skip
    assert claims.ueid == str(made.chain[0].cert.serial_number)


def test_read_only_platform_that_holds_its_family_still_trusts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from shieldml.broker.server.config import BrokerConfig

    d = tmp_path / "ro"
    SimulatedPlatform.open(d, clock=system_clock)
    family = open_gpus(d, clock=system_clock)  # made while writable
    _read_only(monkeypatch)
    assert open_gpus(d, clock=system_clock)[0].root == family[0].root
    cfg = BrokerConfig(database="sqlite://", state_dir=str(tmp_path), simulated_platforms=(str(d),))
    anchors = cfg.trust(announce=False)
    assert fingerprint(family[0].root) in anchors.simulated
    assert fingerprint(family[0].rim_root) in anchors.simulated


def test_read_only_platform_is_an_input_error_for_the_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    d = tmp_path / "ro"
    SimulatedPlatform.open(d, clock=system_clock)
    _read_only(monkeypatch)
    with pytest.raises(InputReadError, match="cannot keep simulated GPUs there"):
        open_gpus(d, clock=system_clock)
    assert not (d / "gpus.json").exists()


def test_fresh_simulated_gpu_is_not_trusted_by_default_anchors():
    """The control of the two tests above: the default anchors hold no simulated root."""
    g = SimulatedGpu(now=datetime.now(UTC))
    assert fingerprint(g.root) not in TrustAnchors().simulated
