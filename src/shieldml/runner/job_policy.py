"""A release policy written from a job manifest (``shieldml policy init --from-job job.toml``).

The policy has one profile that pins the job's workload digest and the measurements of the TEE
it runs in:

- ``tee = "simulated"``: every value the simulated TEE of the manifest's ``[simulated]`` table
  shows (``kind``, its measurements, all zeros where the table gives none; on a simulated TDX
  the RTMR the runner extends with the digest), with ``insecure_allow_simulated = true``. Such a
  policy accepts the simulated runs of exactly this job and nothing else.
- A real TEE: the workload digest and, on TDX, the RTMR the runner extends with it
  (:func:`~shieldml.runner.evidence.expected_rtmr`, from an RTMR nothing else extended). The
  code's own measurements (MRENCLAVE, MRTD, the SEV-SNP launch measurement, ...) are not in the
  job: they come from ``values`` (``--set FIELD=VALUE``), read off a reference quote
  (``shieldml attest verify --json``) or a SIGSTRUCT (``shieldml gramine policy``). A field given
  nowhere is written as ``"any"`` and listed in :attr:`JobPolicy.unpinned`; the policy must still
  validate (the code measurement must be pinned), or :class:`PolicyError` says what to set.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from typing import Any

from shieldml.attest import TeeKind
from shieldml.errors import PolicyError
from shieldml.policy import ANY, FIELDS, MIN_EVALUATION, OPTIONAL, Policy
from shieldml.runner.evidence import RTMR_SIZE, expected_rtmr, simulated_snp_tcb
from shieldml.runner.manifest import JobManifest, to_toml

#: the TEE kind a manifest's ``tee`` runs in (simulated: its [simulated] kind; auto: not known)
_KIND = {"sgx": TeeKind.SGX, "tdx": TeeKind.TDX, "snp": TeeKind.SNP}


@dataclass(frozen=True)
class JobPolicy:
    """The policy's TOML text, what it pins, and what it leaves to ``"any"``."""

    text: str
    tee: TeeKind
    workload_digest: str
    unpinned: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())


def parse_value(kind: str, raw: str) -> Any:
    """``--set NAME=RAW`` for a field of ``kind`` (:data:`shieldml.policy.FIELDS`): a
    hex measurement as given (``any`` too), a list of them comma-separated; otherwise RAW as a
    TOML value (``0``, ``true``, ``{bl = 3, tee = 0, snp = 8, ucode = 115}``)."""
    raw = raw.strip()
    if kind in ("hexlist", "initdata"):
        if raw == ANY:
            return ANY
        items = [x.strip() for x in raw.split(",")]
        return items if kind == "hexlist" else raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def policy_from_job(
    manifest: JobManifest,
    *,
    tee: str | None = None,
    values: dict[str, str] | None = None,
    source: str = "job.toml",
    measured_by: str = "--set",
) -> JobPolicy:
    """The release policy that accepts ``manifest``'s job (see the module's docstring).

    ``tee`` (sgx, tdx, snp) is needed only where the manifest does not say (``tee = "auto"``);
    ``values`` maps profile fields to the raw ``--set`` text of the values to pin
    (:func:`parse_value`; they win over the simulated ones); ``measured_by`` says in the
    policy's header comment where they come from.
    """
    raw_values = dict(values or {})
    gpu_values = {k[4:]: raw_values.pop(k) for k in list(raw_values) if k.startswith("gpu.")}
    kind = _kind(manifest, tee)
    digest = manifest.workload_digest()
    fields = FIELDS[kind]
    unknown = sorted(
        set(raw_values) - set(fields) - ({MIN_EVALUATION} if kind != TeeKind.SNP else set())
    )
    if unknown:
        raise PolicyError(
            f"--set {', '.join(unknown)}: not a field of {kind} profiles",
            hint=f"{kind} profiles take: {', '.join(sorted(fields))}",
        )
    given = {k: parse_value(fields.get(k, ("int", 0))[0], v) for k, v in raw_values.items()}
    simulated = manifest.tee == "simulated"
    refs: dict[str, Any] = _simulated_refs(manifest, kind, digest) if simulated else {}
    notes: list[str] = []
    if kind is TeeKind.TDX and not simulated:
        tdx = manifest.tdx_settings
        name = f"rtmr{tdx.rtmr}"
        if tdx.extend != "off" and name not in given:
            refs[name] = [expected_rtmr(digest).hex()]
            notes.append(
                f"{name} pinned to its value after the runner extends it with the workload digest,"
                f" from zeros (nothing in the VM's boot may extend RTMR{tdx.rtmr}; otherwise"
                f" --set {name}=VALUE)"
            )
    refs.update(given)
    unpinned = []
    for f in fields:
        if f in refs or f in OPTIONAL[kind] or f == "initdata_digest":
            continue
        if f in ("mr_config_id", "host_data") and "initdata_digest" in refs:
            continue
        refs[f] = ANY
        unpinned.append(f)
    profile: dict[str, Any] = {"tee": kind.value}
    profile.update({f: refs[f] for f in (*fields, MIN_EVALUATION) if f in refs})
    profile["workload_digest"] = [digest]
    comments: dict[str, str] = {f"profile.{f}": "not pinned: --set it" for f in unpinned}
    if manifest.gpu is not None:
        profile["gpu"], note = _gpu_requirement(manifest, simulated, gpu_values)
        comments["profile.gpu"] = note
    elif gpu_values:
        raise PolicyError(
            f"--set {', '.join('gpu.' + k for k in sorted(gpu_values))}: the job has no [gpu]"
        )
    if simulated:
        profile["insecure_allow_simulated"] = True
        comments["profile.insecure_allow_simulated"] = "a simulated TEE: tests and trials only"
        if manifest.simulated.get("debug", "false") == "true":
            profile["insecure_allow_debug"] = True
            comments["profile.insecure_allow_debug"] = '[simulated] debug = "true"'
    what = (
        "the measurements of the simulated TEE its [simulated] table describes"
        if simulated
        else f"the measurements given with {measured_by}"
    )
    header = (
        f"# written by `shieldml policy init --from-job {source}`: the job's workload digest and\n"
        f"# {what}\n"
    )
    try:
        text = header + to_toml({"version": 1, "profile": [profile]}, comments)
    except TypeError:  # a --set value TOML reads as a float or a date: no profile field is one
        raise PolicyError(
            "--set: a value is neither an integer, a boolean, a string nor a list of them",
            hint="e.g. --set gpu.count=8, --set isv_prod_id=1",
        ) from None
    try:
        Policy.from_toml(text, "the policy for " + source)
    except PolicyError as e:
        raise PolicyError(
            e.message,
            hint=f"pin the code's measurement: --set FIELD=VALUE ({kind}: "
            f"{', '.join(unpinned) or ', '.join(fields)}), values from a reference quote "
            "(`shieldml attest verify --json`)"
            + (
                " or the enclave's SIGSTRUCT (`shieldml gramine policy`)"
                if kind is TeeKind.SGX
                else ""
            ),
        ) from e
    return JobPolicy(text, kind, digest, tuple(unpinned), tuple(notes))


def _gpu_requirement(
    manifest: JobManifest, simulated: bool, given: dict[str, str]
) -> tuple[dict[str, Any], str]:
    """``[profile.gpu]`` for a job with ``[gpu]``: a profile without it would release the keys
    to the CPU alone, whatever GPU the weights then go to. A simulated job's GPUs are pinned
    as its ``[simulated]`` table describes them; a real job's count and versions are the
    owner's to pin (``--set gpu.count=8``, ``--set gpu.driver_version=550.90.07,550.127.05``;
    the RIM and OCSP checks hold either way). ``given`` (``--set gpu.FIELD=VALUE``) wins."""
    from shieldml.policy import GPU_FIELDS

    unknown = sorted(set(given) - GPU_FIELDS)
    if unknown:
        raise PolicyError(
            f"--set {', '.join('gpu.' + k for k in unknown)}: not a [profile.gpu] field",
            hint=f"[profile.gpu] takes: {', '.join(sorted(GPU_FIELDS))}",
        )
    req: dict[str, Any]
    if simulated and manifest.simulated.get("gpus") != "nvml":  # "nvml": the real GPUs
        from shieldml.runner.gpu import simulated_gpu_settings

        got = simulated_gpu_settings(manifest.simulated)
        req = {
            "count": int(got["gpus"]),
            "driver_version": [got["gpu_driver"]],
            "vbios_version": [got["gpu_vbios"]],
        }
        note = "the simulated GPUs of [simulated]"
    else:
        req = {"count": 1, "driver_version": ANY, "vbios_version": ANY}
        note = "pin count, driver_version and vbios_version to the GPUs you approve"
    req.update({"rim_required": True, "ocsp": "required"})
    for k, raw in given.items():
        text = raw.strip()
        if k in ("driver_version", "vbios_version", "arch", "rim_ids"):
            req[k] = ANY if text == ANY else [x.strip() for x in text.split(",") if x.strip()]
        elif k in ("min_driver_version", "min_vbios_version", "ocsp", "cc_mode"):
            req[k] = text
        else:
            req[k] = parse_value("toml", text)
    if given:
        note += "; --set " + ", ".join(f"gpu.{k}" for k in given)
    return req, note


def _kind(manifest: JobManifest, tee: str | None) -> TeeKind:
    if manifest.tee == "simulated":
        raw = manifest.simulated.get("kind", "sgx")
        try:
            found = TeeKind(raw)
        except ValueError:
            raise PolicyError(f"[simulated] kind must be sgx, tdx or snp, not {raw!r}") from None
    elif manifest.tee in _KIND:
        found = _KIND[manifest.tee]
    elif tee is None:
        raise PolicyError(
            f'the job says tee = "{manifest.tee}": which TEE the policy is for is not known',
            hint="--tee sgx|tdx|snp",
        )
    else:
        return TeeKind(tee)
    if tee is not None and TeeKind(tee) is not found:
        raise PolicyError(f"--tee {tee}: the job runs in {found} (tee = {manifest.tee!r})")
    return found


def _simulated_refs(manifest: JobManifest, kind: TeeKind, digest: str) -> dict[str, Any]:
    """What the runner's simulated provider puts in its evidence for this manifest."""
    sim = manifest.simulated

    def hexval(name: str, size: int) -> list[str]:
        value = sim.get(name, "00" * size).lower()
        if len(value) != 2 * size or any(c not in "0123456789abcdef" for c in value):
            raise PolicyError(f"[simulated] {name} must be {size} bytes of hex")
        return [value]

    if kind is TeeKind.SGX:
        return {
            "mrenclave": hexval("mrenclave", 32),
            "mrsigner": hexval("mrsigner", 32),
            "isv_prod_id": 0,
            "min_isv_svn": 0,
        }
    if kind is TeeKind.SNP:
        refs: dict[str, Any] = {
            "measurement": hexval("measurement", 48),
            "host_data": hexval("host_data", 32),
            "min_reported_tcb": simulated_snp_tcb(),
            "vmpl": 0,
        }
        for name in ("id_key_digest", "author_key_digest"):
            if name in sim:
                refs[name] = hexval(name, 48)
        return refs
    refs = {
        "mrtd": hexval("mrtd", 48),
        **{f"rtmr{i}": hexval(f"rtmr{i}", RTMR_SIZE) for i in range(4)},
        "mr_config_id": hexval("mr_config_id", 48),
    }
    for name in ("mr_owner", "mr_owner_config"):
        if name in sim:
            refs[name] = hexval(name, 48)
    tdx = manifest.tdx_settings
    if tdx.extend != "off":
        before = bytes.fromhex(refs[f"rtmr{tdx.rtmr}"][0])
        refs[f"rtmr{tdx.rtmr}"] = [expected_rtmr(digest, before).hex()]
    return refs
