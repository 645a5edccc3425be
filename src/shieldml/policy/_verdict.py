"""Evaluate a policy against verified Claims: every check of every profile, then one verdict.

The gate (:func:`require`) raises :class:`~shieldml.errors.PolicyDenied` carrying the verdict;
:func:`evaluate` returns it for explanations. Policies see only ``Claims``, never raw evidence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shieldml.attest import Claims, GpuClaims, RootKind, SnpMeasurements, TeeKind
from shieldml.errors import PolicyDenied, PolicyError
from shieldml.policy._model import (
    ANY,
    INITDATA_FIELD,
    SNP_POLICY_BITS,
    GpuRequirement,
    Policy,
    Profile,
    version_key,
)

log = logging.getLogger("shieldml.policy")

#: reference field -> (Claims.measurements attribute, comparison)
_ATTR = {
    "mrenclave": ("mrenclave", "in"),
    "mrsigner": ("mrsigner", "in"),
    "isv_prod_id": ("isv_prod_id", "eq"),
    "min_isv_svn": ("isv_svn", "ge"),
    "mrtd": ("mrtd", "in"),
    "rtmr0": ("rtmr0", "in"),
    "rtmr1": ("rtmr1", "in"),
    "rtmr2": ("rtmr2", "in"),
    "rtmr3": ("rtmr3", "in"),
    "mr_config_id": ("mr_config_id", "in"),
    "mr_owner": ("mr_owner", "in"),
    "mr_owner_config": ("mr_owner_config", "in"),
    "measurement": ("measurement", "in"),
    "host_data": ("host_data", "in"),
    "id_key_digest": ("id_key_digest", "in"),
    "author_key_digest": ("author_key_digest", "in"),
    "vmpl": ("vmpl", "eq"),
    "td_attributes": ("td_attributes", "in"),
    "xfam": ("xfam", "in"),
    "sept_ve_disable": ("sept_ve_disable", "bool"),
}
_LAUNCH = (
    "the VM was launched with another configuration than the owner approved (another job, "
    "another initdata): MRCONFIGID / HOST_DATA are set by whoever launches the VM"
)
_HINTS = {
    "tee": "this profile is for another kind of TEE",
    "root": "evidence from simulated or custom roots is not hardware; allow it only for tests (insecure_allow_*)",
    "debug": "a debug TEE lets the host read its memory; run the workload with debug off",
    "tcb_status": "the platform needs the updates its advisories name, or the policy must knowingly accept this status",
    "advisory_ids": "the platform is exposed to advisories the owner has not accepted",
    "min_tcb_evaluation_data_number": "the collateral is older than the policy allows (an Intel"
    " TCB recovery since): verify with fresh collateral from Intel PCS or an up-to-date PCCS",
    "workload_digest": "the job (manifest or trusted files) differs from the one the owner approved: `shieldml job measure`",
    "min_reported_tcb": "the platform firmware is older than the policy allows",
    "mr_config_id": _LAUNCH,
    "host_data": _LAUNCH,
    "initdata_digest": _LAUNCH,
    "mr_owner": _LAUNCH,
    "mr_owner_config": _LAUNCH,
    "id_key_digest": "the VM's ID block was signed by another key than the policy pins",
    "author_key_digest": "the VM's ID key was certified by another author key than the policy pins",
    "td_attributes": "the TD was launched with other attributes than the policy pins",
    "xfam": "the TD was launched with other extended features (XFAM) than the policy pins",
    "sept_ve_disable": "without SEPT_VE_DISABLE the host can inject #VE exceptions through the TD's page tables",
    "smt_allowed": "the guest policy lets the host schedule other code on the sibling hyperthread",
    "migrate_ma_allowed": "the guest policy admits a migration agent, which can read the guest's memory",
    "revocation": "nobody checked the AMD signing key against AMD's CRL: send the CRL with the"
    " evidence (KDS /vcek/v1/PRODUCT/crl), or start the broker with --amd-kds; a policy accepts"
    " unchecked evidence only with insecure_allow_unchecked_revocation = true",
    "gpu count": "the profile requires this many NVIDIA GPUs with verified evidence beside the CPU's",
    "gpu cc_mode": "GPU not in confidential-computing mode: the host can read its memory "
    "(NVIDIA gpu-admin-tools --set-cc-mode=on, then reset the GPU)",
    "gpu root": "evidence from a simulated GPU is not hardware; allow it only for tests (insecure_allow_simulated)",
    "gpu arch": "the GPU is of another architecture than the policy allows",
    "gpu driver_version": "the GPU driver is not one the owner approved: install an approved driver",
    "gpu vbios_version": "the GPU firmware (VBIOS) is not one the owner approved: update it",
    "gpu rims": "the GPU's measurements were not matched against NVIDIA's signed RIMs: send the "
    "driver and VBIOS RIMs with the evidence",
    "gpu ocsp": "GPU and RIM certificates need current OCSP responses from NVIDIA (collateral)",
}


@dataclass(frozen=True)
class PolicyCheck:
    name: str
    passed: bool
    expected: str
    actual: str
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "passed": self.passed,
            "expected": self.expected,
            "actual": self.actual,
        }
        if not self.passed and self.hint:
            d["hint"] = self.hint
        return d


@dataclass(frozen=True)
class ProfileResult:
    index: int
    tee: str
    checks: tuple[PolicyCheck, ...]
    insecure_used: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.index,
            "tee": self.tee,
            "passed": self.passed,
            "insecure_used": list(self.insecure_used),
            "checks": [c.to_dict() for c in self.checks],
        }


@dataclass(frozen=True)
class Verdict:
    """Every check of every profile; ``allowed`` when one profile passed all of its checks."""

    allowed: bool
    matched: int | None
    profiles: tuple[ProfileResult, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "matched_profile": self.matched,
            "profiles": [p.to_dict() for p in self.profiles],
        }

    def failures(self) -> list[str]:
        """One sentence per failed check, profile by profile."""
        return [
            f"profile {p.index}: {c.name}: expected {c.expected}, found {c.actual}"
            + (f" ({c.hint})" if c.hint else "")
            for p in self.profiles
            for c in p.checks
            if not c.passed
        ]


def _fmt(v: Any) -> str:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, tuple):
        return " or ".join(_fmt(x) for x in v) if v else "(none)"
    if isinstance(v, dict):
        return ", ".join(f"{k}>={x}" for k, x in v.items())
    return str(v)


def _bool(v: bool) -> str:
    return "true" if v else "false"


def _check_profile(
    i: int,
    p: Profile,
    claims: Claims,
    workload_digest: str | None,
    gpus: Sequence[GpuClaims] = (),
) -> ProfileResult:
    checks: list[PolicyCheck] = []
    used: list[str] = []

    def add(name: str, ok: bool, expected: str, actual: str) -> None:
        checks.append(
            PolicyCheck(
                name,
                ok,
                expected,
                actual,
                _HINTS.get(name, "the TEE runs other code than the owner approved"),
            )
        )

    def insecure(switch: str, needed: bool) -> bool:
        if needed and switch in p.insecure:
            used.append(switch)
            return True
        return not needed

    add("tee", claims.tee is p.tee, p.tee.value, claims.tee.value)
    if claims.tee is not p.tee:
        return ProfileResult(i, p.tee.value, tuple(checks))
    root_ok = claims.root is RootKind.VENDOR or insecure(
        "insecure_allow_simulated"
        if claims.root is RootKind.SIMULATED
        else "insecure_allow_custom_root",
        True,
    )
    add("root", root_ok, "vendor", claims.root.value)
    add(
        "debug",
        insecure("insecure_allow_debug", claims.debug),
        "off",
        "on" if claims.debug else "off",
    )
    if claims.tee is not TeeKind.SNP:
        st = claims.tcb_status
        add(
            "tcb_status",
            st in p.tcb_statuses,
            _fmt(tuple(sorted(s.value for s in p.tcb_statuses))),
            st.value if st else "none",
        )
        if p.advisory_ids is not None:
            extra = sorted(set(claims.advisory_ids) - p.advisory_ids)
            add(
                "advisory_ids",
                not extra,
                "only " + (", ".join(sorted(p.advisory_ids)) or "none"),
                ", ".join(extra) or "none",
            )
    if claims.tee is TeeKind.SNP:  # Intel evidence never verifies without its CRLs
        revocation = claims.platform.get("revocation", "not checked")
        add(
            "revocation",
            revocation.startswith("checked")
            or insecure("insecure_allow_unchecked_revocation", True),
            "AMD CRL checked",
            revocation,
        )
    if p.min_tcb_evaluation_data_number is not None:
        number = claims.tcb_evaluation_data_number
        add(
            "min_tcb_evaluation_data_number",
            number is not None and number >= p.min_tcb_evaluation_data_number,
            f">= {p.min_tcb_evaluation_data_number}",
            "none" if number is None else str(number),
        )
    m = claims.measurements
    for name, ref in p.refs.items():
        if ref == ANY:
            continue
        if isinstance(ref, dict):  # min_reported_tcb: every part at least the policy's
            have = {k: int(claims.platform.get(f"reported_tcb_{k}", "-1")) for k in ref}
            add(
                name,
                all(have[k] >= v for k, v in ref.items()),
                _fmt(ref),
                ", ".join(f"{k}={v}" for k, v in have.items()),
            )
            continue
        if name in SNP_POLICY_BITS:  # a guest policy bit the profile requires set or clear
            bit = isinstance(m, SnpMeasurements) and bool(
                m.guest_policy >> SNP_POLICY_BITS[name] & 1
            )
            add(name, bit == bool(ref), _bool(bool(ref)), _bool(bit))
            continue
        if name == "initdata_digest":  # the value expected in MRCONFIGID / HOST_DATA
            field = INITDATA_FIELD[p.tee]
            actual = getattr(m, field)
            ok = isinstance(ref, tuple) and actual in ref  # initdata refs are tuples of bytes
            add(name, ok, f"{field} {_fmt(ref)}", f"{field} {_fmt(actual)}")
            continue
        attr, op = _ATTR[name]
        actual = getattr(m, attr)
        if op == "bool":
            add(name, bool(actual) == bool(ref), _bool(bool(ref)), _bool(bool(actual)))
            continue
        if op == "in":
            ok = isinstance(ref, tuple) and actual in ref
        elif op == "eq":
            ok = actual == ref
        else:
            ok = isinstance(ref, int) and actual >= ref
        expected = _fmt(ref) if op != "ge" else f">= {ref}"
        add(name, ok, expected, _fmt(actual))
    if p.workload_digests is not None:
        wd = workload_digest or "none reported"
        add("workload_digest", workload_digest in p.workload_digests, _fmt(p.workload_digests), wd)
    if p.gpu is not None:
        _check_gpus(p.gpu, gpus, add, insecure)
    return ProfileResult(i, p.tee.value, tuple(checks), tuple(used))


def _version_ok(
    v: str | None, allowed: tuple[str, ...] | None, minimum: str | None, vbios: bool
) -> bool:
    if v is None:
        return allowed is None and minimum is None
    if allowed is not None and v.upper() not in {a.upper() for a in allowed}:
        return False
    try:
        return minimum is None or version_key(v, vbios=vbios) >= version_key(minimum, vbios=vbios)
    except PolicyError:  # a version the device reports that does not compare
        return False


def _expected_version(allowed: tuple[str, ...] | None, minimum: str | None) -> str:
    parts = [" or ".join(allowed)] if allowed is not None else []
    if minimum is not None:
        parts.append(f">= {minimum}")
    return ", ".join(parts) or "any"


def _check_gpus(
    req: GpuRequirement,
    gpus: Sequence[GpuClaims],
    add: Callable[[str, bool, str, str], None],
    insecure: Callable[[str, bool], bool],
) -> None:
    add("gpu count", len(gpus) == req.count, str(req.count), str(len(gpus)))
    for n, g in enumerate(gpus):
        who = f"GPU {n} ({g.arch} {g.ueid[:12]}…)"
        add("gpu cc_mode", g.cc_mode == "on", "on", f"{who}: {g.cc_mode or 'unknown'}")
        root_ok = g.root is RootKind.VENDOR or insecure(
            "insecure_allow_simulated"
            if g.root is RootKind.SIMULATED
            else "insecure_allow_custom_root",
            True,
        )
        add("gpu root", root_ok, "vendor", f"{who}: {g.root.value}")
        if req.archs is not None:
            add("gpu arch", g.arch in req.archs, _fmt(tuple(sorted(req.archs))), f"{who}: {g.arch}")
        add(
            "gpu driver_version",
            _version_ok(g.driver_version, req.driver_versions, req.min_driver_version, False)
            or (g.arch == "nvswitch" and g.driver_version is None),
            _expected_version(req.driver_versions, req.min_driver_version),
            f"{who}: {g.driver_version or 'none'}",
        )
        add(
            "gpu vbios_version",
            _version_ok(g.vbios_version, req.vbios_versions, req.min_vbios_version, True),
            _expected_version(req.vbios_versions, req.min_vbios_version),
            f"{who}: {g.vbios_version or 'none'}",
        )
        if req.rim_required:
            kinds = {r.rim.kind for r in g.rims}
            need = {"vbios"} if g.arch == "nvswitch" else {"vbios", "driver"}
            ids_ok = req.rim_ids is None or set(g.rim_ids) <= req.rim_ids
            add(
                "gpu rims",
                g.measurements_matched and need <= kinds and ids_ok,
                "driver and VBIOS RIMs matched"
                + (f" (ids among {_fmt(tuple(sorted(req.rim_ids)))})" if req.rim_ids else ""),
                f"{who}: "
                + (", ".join(g.rim_ids) + " matched" if g.measurements_matched else "no RIMs"),
            )
        if req.ocsp_required:
            bad = []
            for o in g.ocsp:
                if o.status != "good":
                    bad.append(f"{o.subject}: {o.status}")
                elif o.cached and not req.ocsp_allow_cached:
                    bad.append(f"{o.subject}: cached response, {o.age_s} s old, past nextUpdate")
                elif req.ocsp_max_age is not None and (o.age_s or 0) > req.ocsp_max_age:
                    bad.append(f"{o.subject}: {o.age_s} s old")
            ages = [o.age_s for o in g.ocsp if o.age_s is not None]
            state = f"all good (oldest {max(ages)} s)" if ages and not bad else "; ".join(bad)
            add(
                "gpu ocsp",
                not bad,
                "good OCSP status for every certificate"
                + (f", at most {req.ocsp_max_age} s old" if req.ocsp_max_age is not None else "")
                + ("" if req.ocsp_allow_cached else ", current"),
                f"{who}: {state or 'no certificates'}",
            )


def evaluate(
    policy: Policy,
    claims: Claims,
    workload_digest: str | None = None,
    gpus: Sequence[GpuClaims] = (),
) -> Verdict:
    """Run every check of every profile (no short-cut), so a denial can list all failures.

    ``gpus``: the verified GPU evidence bound to the same session as ``claims`` (a profile
    with ``[profile.gpu]`` checks them; one without ignores them)."""
    results = tuple(
        _check_profile(i + 1, p, claims, workload_digest, gpus)
        for i, p in enumerate(policy.profiles)
    )
    matched = next((r.index for r in results if r.passed), None)
    if matched is not None:
        for switch in results[matched - 1].insecure_used:
            log.warning(
                "insecure: policy switch %s was used to accept %s evidence",
                switch,
                claims.tee.value,
            )
    return Verdict(matched is not None, matched, results)


def require(
    policy: Policy,
    claims: Claims,
    workload_digest: str | None = None,
    gpus: Sequence[GpuClaims] = (),
) -> Verdict:
    """The gate: the verdict if some profile accepts the claims, :class:`PolicyDenied` otherwise."""
    verdict = evaluate(policy, claims, workload_digest, gpus)
    if not verdict.allowed:
        failures = verdict.failures()
        raise PolicyDenied(
            "policy denied: "
            + (failures[0] if len(failures) == 1 else f"{len(failures)} checks failed"),
            verdict,
            hint="; ".join(failures[:6]),
        )
    return verdict


def listed_gpu_problems(profile: Profile, listed: Any, brokers: Any) -> list[str]:
    """What keeps the GPUs a receipt lists (``listed``: per broker, each GPU's summary as that
    broker verified it at the release, :meth:`GpuClaims.summary`) from meeting ``profile``'s
    ``[profile.gpu]``: for every one of ``brokers`` (those that released keys), exactly
    ``count`` GPUs in CC mode, of an accepted root, architecture, driver, VBIOS and RIMs. The
    OCSP and measurement checks were the broker's at the release (its audit record lists the
    outcome); none of this re-verifies GPU evidence. ``listed`` and ``brokers`` are read from
    a receipt: anything malformed is a problem, never an exception."""
    req = profile.gpu
    if req is None:
        return []
    seqs = brokers
    if not isinstance(listed, dict):
        listed = {}
    roots = {"vendor"}
    if "insecure_allow_simulated" in profile.insecure:
        roots.add("simulated")
    if "insecure_allow_custom_root" in profile.insecure:
        roots.add("custom")
    problems = []
    if not isinstance(seqs, dict) or not seqs:  # no broker released keys: none saw the GPUs
        return [
            f"no broker verified any GPU (the run released no key); the policy requires {req.count}"
        ]
    for broker in sorted(seqs):
        gpus = listed.get(broker)
        if not isinstance(gpus, list) or len(gpus) != req.count:
            n = len(gpus) if isinstance(gpus, list) else 0
            problems.append(f"broker {broker}: {n} GPU(s) listed, the policy requires {req.count}")
            continue
        ueids = [g.get("ueid") if isinstance(g, dict) else None for g in gpus]
        for i, g in enumerate(gpus):
            who = f"broker {broker}: GPU {i}"
            if not isinstance(g, dict):
                problems.append(f"{who}: not a GPU record")
                continue
            if ueids.index(g.get("ueid")) != i:
                problems.append(f"{who}: the same GPU as GPU {ueids.index(g.get('ueid'))}")
            arch, drv, vb = g.get("arch"), g.get("driver_version"), g.get("vbios_version")
            root = g.get("root")
            if g.get("cc_mode") != "on":
                problems.append(f"{who}: CC mode {g.get('cc_mode')!r}")
            if not isinstance(root, str) or root not in roots:
                problems.append(f"{who}: root {root!r} not accepted")
            if req.archs is not None and (not isinstance(arch, str) or arch not in req.archs):
                problems.append(f"{who}: architecture {arch!r}")
            drv_ok = (isinstance(drv, str) or drv is None) and _version_ok(
                drv, req.driver_versions, req.min_driver_version, False
            )
            if not drv_ok and not (arch == "nvswitch" and drv is None):
                problems.append(f"{who}: driver {drv!r} not approved")
            vb_ok = (isinstance(vb, str) or vb is None) and _version_ok(
                vb, req.vbios_versions, req.min_vbios_version, True
            )
            if not vb_ok:
                problems.append(f"{who}: VBIOS {vb!r} not approved")
            if req.rim_required:  # as the broker's "gpu rims" check
                ids, kinds = g.get("rim_ids"), g.get("rim_kinds")
                need = {"vbios"} if arch == "nvswitch" else {"vbios", "driver"}
                listed_ok = all(
                    isinstance(x, list) and all(isinstance(i, str) for i in x) for x in (ids, kinds)
                )
                ok = (
                    listed_ok
                    and g.get("measurements_matched") is True
                    and need <= set(kinds or ())
                    and len(set(ids or ())) >= len(need)  # one RIM id per RIM matched
                    and (req.rim_ids is None or set(ids or ()) <= req.rim_ids)
                )
                if not ok:
                    problems.append(
                        f"{who}: RIMs {ids!r} ({kinds!r}, matched {g.get('measurements_matched')!r});"
                        f" the policy requires {' and '.join(sorted(need))} RIMs matched"
                    )
    return problems
