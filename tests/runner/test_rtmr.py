"""The workload digest is measured into a TDX RTMR, not only claimed in report data (issue 12, 7).

Any root process in a TD can ask configfs-tsm for a quote whose report data names the approved
workload digest. An RTMR cannot be reset, only extended, so the runner extends one (``[tdx]
rtmr``, 3 by default) with the digest before the run's first evidence: a policy that pins the
value the RTMR reaches from a fresh VM (:func:`expected_rtmr`) refuses a VM in which anything else
was measured there first, such as another job whose processes may still be running.

The kernel interface (Linux 6.16+, ``/sys/class/misc/tdx_guest/measurements/rtmr3:sha384``) is
played by a fake tree: the provider must read the register, then write exactly the 48-byte
extension value at offset 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shieldml.attest import Claims, IntelCollateral, verify_evidence
from shieldml.errors import EvidenceError, ManifestError, PolicyDenied
from shieldml.policy import Policy, Verdict, require
from shieldml.runner.evidence import (
    RTMR_DOMAIN,
    ConfigfsTsmProvider,
    SimulatedProvider,
    expected_rtmr,
    provider_for,
    rtmr_after,
    rtmr_extend_value,
)
from shieldml.runner.manifest import JobManifest
from shieldml.testing.simulated import SimulatedPlatform, fixed_clock

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
DIGEST = "sha256:" + "ab" * 32
OTHER_JOB = "sha256:" + "cd" * 32
MRTD = "5d" * 48
BOOT_RTMR3 = bytes.fromhex("17" * 48)  # what the image's boot left in RTMR3 (usually zeros)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.open(tmp_path_factory.mktemp("sim"), clock=fixed_clock(NOW))


def _fake_measurements(root: Path, rtmr3: bytes = BOOT_RTMR3) -> Path:
    """What the tdx_guest driver shows in sysfs (regular files: a write replaces the content)."""
    d = root / "tdx_guest" / "measurements"
    d.mkdir(parents=True)
    for name in ("mrtd:sha384", "rtmr0:sha384", "rtmr1:sha384", "rtmr2:sha384"):
        (d / name).write_bytes(bytes(48))
    (d / "rtmr3:sha384").write_bytes(rtmr3)
    return d


class FakeTdx:
    """Plays configfs-tsm on a TD: each report entry gets a quote whose RTMR3 ``rtmr3()`` says."""

    def __init__(self, root: Path, sim: SimulatedPlatform, rtmr3: Callable[[], bytes]) -> None:
        self.root, self.sim, self.rtmr3 = root, sim, rtmr3
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            for inblob in self.root.glob("*/inblob"):
                out = inblob.parent / "outblob"
                rd = inblob.read_bytes()
                if out.exists() or len(rd) != 64:
                    continue
                rtmrs = (bytes(48), bytes(48), bytes(48), self.rtmr3())
                quote, _ = self.sim.tdx_quote(report_data=rd, rtmrs=rtmrs, now=NOW)
                (inblob.parent / "provider").write_text("tdx_guest\n")
                out.write_bytes(quote)
            time.sleep(0.005)


@pytest.fixture
def tsm(tmp_path: Path) -> Path:
    d = tmp_path / "tsm"
    d.mkdir()
    return d


@contextlib.contextmanager
def _kernel(tsm: Path, sim: SimulatedPlatform, rtmr3: Callable[[], bytes]) -> Iterator[None]:
    fake = FakeTdx(tsm, sim, rtmr3)
    try:
        yield
    finally:
        fake.stop.set()
        fake.thread.join()


# -- the extension value and what a policy pins ---------------------------------------------------


def test_extension_value_and_expected_rtmr_are_the_documented_formulas():
    value = hashlib.sha384(b"shieldml/v1 workload rtmr\0" + DIGEST.encode()).digest()
    assert RTMR_DOMAIN == b"shieldml/v1 workload rtmr\0"
    assert rtmr_extend_value(DIGEST) == value
    assert expected_rtmr(DIGEST) == hashlib.sha384(bytes(48) + value).digest()
    assert expected_rtmr(DIGEST, BOOT_RTMR3) == hashlib.sha384(BOOT_RTMR3 + value).digest()
    assert rtmr_after(bytes(48)) == bytes(48)
    with pytest.raises(ValueError, match="48 bytes"):
        rtmr_after(bytes(32), value)


# -- the kernel interface (fake sysfs tree) --------------------------------------------------------


def test_workload_digest_is_extended_into_rtmr3_through_the_tdx_guest_sysfs_file(
    tmp_path: Path, tsm: Path
):
    meas = _fake_measurements(tmp_path)
    p = ConfigfsTsmProvider(tsm, measurements=meas)
    b = p.bind_workload(DIGEST)
    assert b is not None and b.extended and b.rtmr == 3
    assert (meas / "rtmr3:sha384").read_bytes() == rtmr_extend_value(DIGEST)  # the 48 bytes written
    assert (meas / "rtmr2:sha384").read_bytes() == bytes(48)  # no other register touched
    assert b.before == BOOT_RTMR3 and b.after == expected_rtmr(DIGEST, BOOT_RTMR3)
    assert b.to_dict()["after"] == expected_rtmr(DIGEST, BOOT_RTMR3).hex()
    assert "RTMR3 extended" in b.describe()


def test_rtmr2_when_the_manifest_says_so(tmp_path: Path, tsm: Path):
    meas = _fake_measurements(tmp_path)
    b = ConfigfsTsmProvider(tsm, measurements=meas, rtmr=2).bind_workload(DIGEST)
    assert b is not None and b.extended and b.after == expected_rtmr(DIGEST)
    assert (meas / "rtmr2:sha384").read_bytes() == rtmr_extend_value(DIGEST)
    assert (meas / "rtmr3:sha384").read_bytes() == BOOT_RTMR3


def test_extension_happens_once_per_run(tmp_path: Path, tsm: Path):
    meas = _fake_measurements(tmp_path)
    p = ConfigfsTsmProvider(tsm, measurements=meas)
    first = p.bind_workload(DIGEST)
    (meas / "rtmr3:sha384").write_bytes(b"\x99" * 48)
    assert p.bind_workload(DIGEST) is first  # not extended a second time
    assert (meas / "rtmr3:sha384").read_bytes() == b"\x99" * 48
    with pytest.raises(EvidenceError, match="already extended"):
        p.bind_workload(OTHER_JOB)


def test_without_the_kernel_interface_the_run_goes_on_with_a_note(tmp_path: Path, tsm: Path):
    p = ConfigfsTsmProvider(tsm, measurements=tmp_path / "absent")
    b = p.bind_workload(DIGEST)
    assert b is not None and not b.extended and b.after is None
    assert "no TDX RTMR extension" in b.note and "cannot pin RTMR3" in b.note


def test_without_the_kernel_interface_a_job_that_requires_the_extension_is_refused(
    tmp_path: Path, tsm: Path
):
    p = ConfigfsTsmProvider(tsm, measurements=tmp_path / "absent", extend="required")
    with pytest.raises(EvidenceError, match="cannot extend RTMR3") as e:
        p.bind_workload(DIGEST)
    assert "6.16" in (e.value.hint or "")


def test_an_unwritable_register_refuses_a_job_that_requires_the_extension(
    tmp_path: Path, tsm: Path
):
    meas = tmp_path / "m"
    (meas / "rtmr3:sha384").mkdir(parents=True)  # opens, but reads and writes fail (EISDIR)
    with pytest.raises(EvidenceError, match="failed"):
        ConfigfsTsmProvider(tsm, measurements=meas, extend="required").bind_workload(DIGEST)
    b = ConfigfsTsmProvider(tsm, measurements=meas).bind_workload(DIGEST)
    assert b is not None and not b.extended and "failed" in b.note


def test_extension_off_writes_nothing(tmp_path: Path, tsm: Path):
    meas = _fake_measurements(tmp_path)
    b = ConfigfsTsmProvider(tsm, measurements=meas, extend="off").bind_workload(DIGEST)
    assert b is not None and not b.extended and "off" in b.note
    assert (meas / "rtmr3:sha384").read_bytes() == BOOT_RTMR3


def test_snp_job_has_no_rtmr_to_extend():
    assert provider_for("snp").bind_workload(DIGEST) is None


def test_quote_carrying_the_extended_rtmr_is_returned(
    tmp_path: Path, tsm: Path, sim: SimulatedPlatform
):
    meas = _fake_measurements(tmp_path)
    p = ConfigfsTsmProvider(tsm, timeout=10, measurements=meas)
    p.bind_workload(DIGEST)
    with _kernel(tsm, sim, lambda: expected_rtmr(DIGEST, BOOT_RTMR3)):
        ev = p.evidence(bytes(64))
    assert ev.tee == "tdx"


def test_quote_whose_rtmr_something_else_extended_during_the_run_stops_it(
    tmp_path: Path, tsm: Path, sim: SimulatedPlatform
):
    """Another process in the VM extended RTMR3 after the runner: the runner's own record and
    the quote disagree, and the run stops before any broker sees the evidence."""
    meas = _fake_measurements(tmp_path)
    p = ConfigfsTsmProvider(tsm, timeout=10, measurements=meas)
    p.bind_workload(DIGEST)
    tampered = rtmr_after(expected_rtmr(DIGEST, BOOT_RTMR3), rtmr_extend_value(OTHER_JOB))
    with _kernel(tsm, sim, lambda: tampered):
        with pytest.raises(EvidenceError, match=r"quote's RTMR3 is .*, not ") as e:
            p.evidence(bytes(64))
    assert "nothing but the job" in (e.value.hint or "")


# -- policies pin the RTMR (simulated TD, real verification) -------------------------------------


def _rtmr3_policy(digest: str, before: bytes = bytes(48)) -> Policy:
    return Policy.from_toml(
        f"""
[[profile]]
tee = "tdx"
mrtd = "{MRTD}"
rtmr0 = "any"
rtmr1 = "any"
rtmr2 = "any"
rtmr3 = "{expected_rtmr(digest, before).hex()}"
mr_config_id = "any"
workload_digest = ["{digest}"]
insecure_allow_simulated = true
"""
    )


def _verify(provider: SimulatedProvider) -> Claims:
    ev = provider.evidence(bytes(64))
    col = IntelCollateral.from_json(json.dumps(ev.collateral))
    return verify_evidence(ev.data, collateral=col, now=NOW, trust=provider.platform.trust())


def _sim_provider(
    sim: SimulatedPlatform, tmp: Path, rtmr3: bytes = bytes(48), extend: str = "if-available"
) -> SimulatedProvider:
    sim.save(tmp)
    m = {"mrtd": MRTD, "rtmr3": rtmr3.hex()}  # [simulated]: the TD as the host launched it
    return SimulatedProvider(tmp, "tdx", m, clock=fixed_clock(NOW), extend=extend)


def test_policy_pinning_rtmr3_accepts_a_fresh_vm_that_ran_exactly_this_job(
    sim: SimulatedPlatform, tmp_path: Path
):
    p = _sim_provider(sim, tmp_path)
    p.bind_workload(DIGEST)
    assert require(_rtmr3_policy(DIGEST), _verify(p), DIGEST).allowed


def test_policy_pinning_rtmr3_denies_a_vm_that_ran_another_job_first(
    sim: SimulatedPlatform, tmp_path: Path
):
    """The host reuses a VM in which another job ran (its processes may still be there): the
    RTMR holds that job's extension, so this job's release is refused."""
    used = expected_rtmr(OTHER_JOB)
    p = _sim_provider(sim, tmp_path, rtmr3=used)
    p.bind_workload(DIGEST)
    with pytest.raises(PolicyDenied) as e:
        require(_rtmr3_policy(DIGEST), _verify(p), DIGEST)
    verdict = e.value.verdict
    assert isinstance(verdict, Verdict)
    failed = {c.name: (c.expected, c.actual) for c in verdict.profiles[0].checks if not c.passed}
    assert failed == {
        "rtmr3": (expected_rtmr(DIGEST).hex(), rtmr_after(used, rtmr_extend_value(DIGEST)).hex())
    }


def test_policy_pinning_rtmr3_denies_a_run_that_skipped_the_extension(
    sim: SimulatedPlatform, tmp_path: Path
):
    """A runner (or any process) that asks for a quote without measuring the job leaves the RTMR
    at its boot value: the report data may name the approved digest, the RTMR does not."""
    p = _sim_provider(sim, tmp_path, extend="off")
    p.bind_workload(DIGEST)
    with pytest.raises(PolicyDenied, match="rtmr3"):
        require(_rtmr3_policy(DIGEST), _verify(p), DIGEST)


# -- the manifest's [tdx] table ----------------------------------------------------------------------


def _manifest(tmp_path: Path, extra: str = "", tee: str = "tdx") -> JobManifest:
    m = tmp_path / "job.toml"
    m.write_text(f'tee = "{tee}"\n[command]\nargv = ["/usr/bin/true"]\n{extra}')
    return JobManifest.load(m)


def test_tdx_table_is_parsed_and_measured(tmp_path: Path):
    plain = _manifest(tmp_path)
    assert plain.tdx is None and plain.tdx_settings.rtmr == 3
    assert plain.tdx_settings.extend == "if-available"
    required = _manifest(tmp_path, '[tdx]\nrtmr = 2\nextend = "required"\n')
    assert (required.tdx_settings.rtmr, required.tdx_settings.extend) == (2, "required")
    digests = {plain.workload_digest(), required.workload_digest()}
    digests.add(_manifest(tmp_path, '[tdx]\nextend = "off"\n').workload_digest())
    assert len(digests) == 3  # the host cannot turn the extension off under the same digest


@pytest.mark.parametrize(
    ("extra", "tee", "message"),
    [
        ("[tdx]\nrtmr = 1\n", "tdx", "rtmr must be 2 or 3"),
        ("[tdx]\nrtmr = true\n", "tdx", "rtmr must be 2 or 3"),
        ('[tdx]\nextend = "yes"\n', "tdx", "extend must be one of"),
        ('[tdx]\nextend = "required"\n', "snp", "only TDX has RTMRs"),
        ("[tdx]\nregister = 3\n", "tdx", "unknown field"),
    ],
)
def test_invalid_tdx_table_is_refused(tmp_path: Path, extra: str, tee: str, message: str):
    with pytest.raises(ManifestError, match=message):
        _manifest(tmp_path, extra, tee)


def test_provider_for_passes_the_manifest_settings():
    p = provider_for("tdx", rtmr=2, extend="required")
    assert isinstance(p, ConfigfsTsmProvider) and (p.rtmr, p.extend) == (2, "required")
