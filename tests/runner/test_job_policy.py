"""``shieldml policy init --from-job``: the policy it writes accepts that job's simulated runs
and nothing else; for real TEEs it pins what the job determines and refuses to guess the rest."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from shieldml.attest import IntelCollateral, verify_evidence
from shieldml.cli import main
from shieldml.policy import Policy, evaluate
from shieldml.runner.evidence import expected_rtmr, provider_for
from shieldml.runner.manifest import JobManifest
from shieldml.testing.simulated import SimulatedPlatform, system_clock


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sim")
    SimulatedPlatform.open(d, clock=system_clock)
    return d


def write_job(tmp_path: Path, tee: str, extra: str = "") -> Path:
    (tmp_path / "infer.py").write_text("print('hi')\n")
    job = tmp_path / "job.toml"
    assert main(["job", "init", str(tmp_path / "infer.py"), "-o", str(job), "--tee", tee]) == 0
    if extra:
        text = job.read_text()
        if tee == "simulated":  # replace the scaffold's [simulated] table by the test's
            start = text.index("[simulated]")
            end = text.index("[[trusted]]")
            text = text[:start] + text[end:]
        job.write_text(text + "\n" + extra)
    return job


def simulated_verdict(job: Path, policy: Policy, platform: Path) -> bool:
    """What a broker decides on the evidence the runner's simulated provider makes for ``job``."""
    m = JobManifest.load(job)
    digest = m.workload_digest()
    tdx = m.tdx_settings
    provider = provider_for(m.tee, m.simulated, base=m.base, rtmr=tdx.rtmr, extend=tdx.extend)
    provider.bind_workload(digest)
    ev = provider.evidence(bytes(64))
    col = IntelCollateral.from_json(json.dumps(ev.collateral)) if ev.collateral else None
    sim = SimulatedPlatform.open(platform, clock=system_clock)
    crl = sim.amd_crl() if ev.tee == "snp" else None  # what a broker trusting it checks against
    claims = verify_evidence(
        ev.data, tee=ev.tee, collateral=col, vcek=ev.vcek, trust=sim.trust(), amd_crl=crl
    )
    return evaluate(policy, claims, digest).allowed


@pytest.mark.parametrize(
    "kind, measurements",
    [
        ("sgx", 'mrenclave = "' + "5e" * 32 + '"'),
        ("tdx", 'mrtd = "' + "7a" * 48 + '"\nrtmr3 = "' + "01" * 48 + '"'),
        ("snp", 'measurement = "' + "9c" * 48 + '"'),
    ],
)
def test_the_policy_accepts_the_jobs_simulated_runs_and_only_them(
    tmp_path: Path, platform: Path, kind: str, measurements: str
):
    sim = f'[simulated]\nplatform = "{platform}"\nkind = "{kind}"\n{measurements}\n'
    job = write_job(tmp_path, "simulated", sim)
    out = tmp_path / "policy.toml"
    assert main(["policy", "init", "--from-job", str(job), "-o", str(out)]) == 0
    policy = Policy.from_toml(out.read_text())
    (profile,) = tomllib.loads(out.read_text())["profile"]
    assert profile["tee"] == kind and profile["insecure_allow_simulated"] is True
    assert "any" not in profile.values()
    assert simulated_verdict(job, policy, platform)
    # the same job on a TEE whose code measures otherwise: denied
    code = measurements.split('"')[1]
    job.write_text(job.read_text().replace(code, "11" * (len(code) // 2)))
    assert not simulated_verdict(job, policy, platform)


def test_a_changed_script_is_not_accepted(tmp_path: Path, platform: Path):
    job = write_job(tmp_path, "simulated", f'[simulated]\nplatform = "{platform}"\nkind = "tdx"\n')
    out = tmp_path / "policy.toml"
    assert main(["policy", "init", "--from-job", str(job), "-o", str(out)]) == 0
    policy = Policy.from_toml(out.read_text())
    assert simulated_verdict(job, policy, platform)
    (tmp_path / "infer.py").write_text("print('something else')\n")
    assert main(["job", "init", str(tmp_path / "infer.py"), "-o", str(tmp_path / "j2.toml"),
                 "--tee", "simulated", "--simulated-platform", str(platform)]) == 0  # fmt: skip
    j2 = tmp_path / "j2.toml"
    j2.write_text(j2.read_text().replace('kind = "sgx"', 'kind = "tdx"'))
    assert not simulated_verdict(j2, policy, platform)


def test_an_existing_policy_is_kept_unless_forced(tmp_path: Path, platform: Path):
    job = write_job(tmp_path, "simulated", f'[simulated]\nplatform = "{platform}"\n')
    out = tmp_path / "policy.toml"
    out.write_text("mine\n")
    assert main(["policy", "init", "--from-job", str(job), "-o", str(out)]) == 1
    assert out.read_text() == "mine\n"
    assert main(["policy", "init", "--from-job", str(job), "-o", str(out), "--force"]) == 0
    Policy.from_toml(out.read_text())


def test_real_tdx_pins_the_digest_and_the_extended_rtmr_and_needs_mrtd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    job = write_job(tmp_path, "tdx", "[tdx]\nrtmr = 2\n")
    out = tmp_path / "policy.toml"
    assert main(["policy", "init", "--from-job", str(job), "-o", str(out)]) == 1
    assert "mrtd" in capsys.readouterr().err and not out.exists()
    mrtd = "ab" * 48
    rc = main(["policy", "init", "--from-job", str(job), "-o", str(out), "--set", f"mrtd={mrtd}",
               "--set", "mr_config_id=" + "00" * 48])  # fmt: skip
    assert rc == 0
    (profile,) = tomllib.loads(out.read_text())["profile"]
    digest = JobManifest.load(job).workload_digest()
    assert profile["workload_digest"] == [digest]
    assert profile["mrtd"] == [mrtd] and profile["mr_config_id"] == ["00" * 48]
    assert profile["rtmr2"] == [expected_rtmr(digest).hex()]
    assert {k for k, v in profile.items() if v == "any"} == {"rtmr0", "rtmr1", "rtmr3"}
    assert "insecure_allow_simulated" not in profile
    assert "not pinned" in capsys.readouterr().out


def test_auto_needs_tee_and_unknown_fields_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    job = write_job(tmp_path, "auto")
    out = str(tmp_path / "policy.toml")
    assert main(["policy", "init", "--from-job", str(job), "-o", out]) == 1
    assert "--tee" in capsys.readouterr().err
    assert main(["policy", "init", "--from-job", str(job), "-o", out, "--tee", "sgx",
                 "--set", "mrtd=" + "ab" * 48]) == 1  # fmt: skip
    assert "not a field of sgx profiles" in capsys.readouterr().err
    assert main(["policy", "init", "--from-job", str(job), "-o", out, "--tee", "sgx",
                 "--set", "mrenclave=" + "cd" * 32, "--set", "mrsigner=any"]) == 0  # fmt: skip
    (profile,) = tomllib.loads(Path(out).read_text())["profile"]
    assert profile["mrenclave"] == ["cd" * 32] and profile["mrsigner"] == "any"
    assert profile["isv_prod_id"] == "any"


def test_a_job_with_gpus_gets_a_gpu_requirement(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A policy written for a [gpu] job without [profile.gpu] would release the keys to the CPU
    evidence alone, whatever GPU (CC mode off, say) the weights then go to."""
    job = write_job(tmp_path, "tdx", '[gpu]\nevidence = "nvml"\n')
    out = tmp_path / "policy.toml"
    base = ["policy", "init", "--from-job", str(job), "-o", str(out), "--force",
            "--set", "mrtd=" + "ab" * 48, "--set", "mr_config_id=" + "00" * 48]  # fmt: skip
    assert main(base) == 0
    (profile,) = tomllib.loads(out.read_text())["profile"]
    assert profile["gpu"] == {
        "count": 1, "driver_version": "any", "vbios_version": "any",
        "rim_required": True, "ocsp": "required",
    }  # fmt: skip
    policy = Policy.from_toml(out.read_text())
    assert policy.profiles[0].gpu is not None and policy.profiles[0].gpu.count == 1
    assert main([*base, "--set", "gpu.count=8",
                 "--set", "gpu.driver_version=550.90.07, 550.127.05",
                 "--set", "gpu.min_vbios_version=96.00.9F.00.00"]) == 0  # fmt: skip
    gpu = tomllib.loads(out.read_text())["profile"][0]["gpu"]
    assert gpu["count"] == 8 and gpu["driver_version"] == ["550.90.07", "550.127.05"]
    assert gpu["min_vbios_version"] == "96.00.9F.00.00"
    capsys.readouterr()
    assert main([*base, "--set", "gpu.colour=green"]) == 1
    assert "not a [profile.gpu] field" in capsys.readouterr().err
    assert main([*base, "--set", "gpu.count=99"]) == 1
    assert "count must be an integer from 1 to 16" in capsys.readouterr().err


def test_gpu_settings_without_a_gpu_table_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    job = write_job(tmp_path, "tdx")
    out = tmp_path / "policy.toml"
    assert main(["policy", "init", "--from-job", str(job), "-o", str(out), "--set",
                 "mrtd=" + "ab" * 48, "--set", "gpu.count=2"]) == 1  # fmt: skip
    assert "the job has no [gpu]" in capsys.readouterr().err and not out.exists()
