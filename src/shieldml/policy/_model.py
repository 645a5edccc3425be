"""Release policies as data: a TOML file that mirrors these frozen objects one to one.

```toml
version = 1

[[profile]]                      # any one profile may match
tee = "sgx"
mrenclave = ["33d8...2fbb"]      # a list of accepted values, or "any"
mrsigner = "any"
isv_prod_id = 0
min_isv_svn = 0
workload_digest = ["sha256:..."]
tcb_status = ["UpToDate"]        # default; OutOfDate* needs insecure_allow_out_of_date
advisory_ids = []                # allowed advisories; default none
```

Every reference field of a profile's TEE must be set; ``"any"`` skips one explicitly. Unknown
fields, empty policies and profiles that pin no measurement at all are errors, never passes.

TDX profiles must pin ``mrtd`` and SEV-SNP profiles ``measurement`` (the launch measurement of
the code; RTMRs, ``host_data`` and initdata are set or extended by whoever launches the VM).

A few fields are optional (``"any"`` when absent): TDX ``mr_owner``, ``mr_owner_config``,
``td_attributes`` and ``xfam`` (exact 8-byte values as the quote carries them) and
``sept_ve_disable`` (true/false); SEV-SNP ``id_key_digest``, ``author_key_digest`` and the guest
policy bits ``smt_allowed`` and ``migrate_ma_allowed`` (false: the bit must be clear). Debug is
always checked (``insecure_allow_debug``). ``initdata_digest`` (TDX and SEV-SNP) pins the VM's
launch configuration the way Confidential Containers binds its *initdata* document: the digest
(``sha256:``/``sha384:``/``sha512:`` + hex, of the initdata TOML as written) is the value expected in
TDX ``MRCONFIGID`` (48 bytes) or SEV-SNP ``HOST_DATA`` (32 bytes), zero-padded at the end when
shorter, cut at the end when longer. It stands for ``mr_config_id`` / ``host_data``: a profile
gives one or the other, not both.

A TDX or SEV-SNP profile may require NVIDIA confidential-computing GPUs beside the CPU
evidence (``[profile.gpu]``, see :class:`GpuRequirement`); such a profile refuses CPU-only
evidence, and every GPU's evidence must be bound to the same session as the CPU's.

```toml
[profile.gpu]
count = 1                          # exactly this many GPUs, each with verified evidence
driver_version = ["550.90.07"]     # or "any"; min_driver_version = "550.90" for a floor
vbios_version = "any"              # or a list; min_vbios_version = "96.00.9F.00.00"
arch = ["hopper"]                  # optional: hopper, blackwell, nvswitch
rim_required = true                # default: every active golden measurement matched
rim_ids = ["NV_GPU_VBIOS_1010_0200_882_96009F0001"]   # optional
ocsp = "required"                  # default; "not-required" skips revocation
ocsp_allow_cached = false          # accept responses past their nextUpdate
ocsp_max_age = 86400               # optional: seconds since the response's thisUpdate
```
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from typing import Any

from shieldml.attest import TcbStatus, TeeKind
from shieldml.errors import PolicyError, unknown_fields_hint

ANY = "any"
MAX_POLICY = 256 * 1024
OUT_OF_DATE = {TcbStatus.OUT_OF_DATE, TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED}
INSECURE = (
    "insecure_allow_debug",
    "insecure_allow_simulated",
    "insecure_allow_custom_root",
    "insecure_allow_out_of_date",
)
COMMON = {
    "tee", "workload_digest", "tcb_status", "advisory_ids", "description", "gpu", *INSECURE,
}  # fmt: skip
#: SEV-SNP evidence nobody checked against AMD's CRL is refused unless a profile sets this
UNCHECKED_REVOCATION = "insecure_allow_unchecked_revocation"
GPU_FIELDS = {
    "count", "cc_mode", "driver_version", "vbios_version", "min_driver_version",
    "min_vbios_version", "arch", "rim_required", "rim_ids", "ocsp", "ocsp_allow_cached",
    "ocsp_max_age",
}  # fmt: skip
GPU_ARCHS = ("hopper", "blackwell", "nvswitch")
MAX_GPUS = 16
#: Intel collateral's minimum tcbEvaluationDataNumber (optional, SGX and TDX profiles only)
MIN_EVALUATION = "min_tcb_evaluation_data_number"
#: reference fields per TEE: name -> (kind, byte length for hex values)
FIELDS: dict[TeeKind, dict[str, tuple[str, int]]] = {
    TeeKind.SGX: {
        "mrenclave": ("hexlist", 32),
        "mrsigner": ("hexlist", 32),
        "isv_prod_id": ("int", 0),
        "min_isv_svn": ("int", 0),
    },
    TeeKind.TDX: {
        "mrtd": ("hexlist", 48),
        "rtmr0": ("hexlist", 48),
        "rtmr1": ("hexlist", 48),
        "rtmr2": ("hexlist", 48),
        "rtmr3": ("hexlist", 48),
        "mr_config_id": ("hexlist", 48),
        "mr_owner": ("hexlist", 48),
        "mr_owner_config": ("hexlist", 48),
        "initdata_digest": ("initdata", 48),
        "td_attributes": ("hexlist", 8),
        "xfam": ("hexlist", 8),
        "sept_ve_disable": ("bool", 0),
    },
    TeeKind.SNP: {
        "measurement": ("hexlist", 48),
        "host_data": ("hexlist", 32),
        "min_reported_tcb": ("tcb", 0),
        "vmpl": ("int", 0),
        "id_key_digest": ("hexlist", 48),
        "author_key_digest": ("hexlist", 48),
        "initdata_digest": ("initdata", 32),
        "smt_allowed": ("bool", 0),
        "migrate_ma_allowed": ("bool", 0),
    },
}
#: fields that may be left out (then ``"any"``)
OPTIONAL = {
    TeeKind.SGX: frozenset[str](),
    TeeKind.TDX: frozenset(
        {"mr_owner", "mr_owner_config", "td_attributes", "xfam", "sept_ve_disable"}
    ),
    TeeKind.SNP: frozenset(
        {"id_key_digest", "author_key_digest", "smt_allowed", "migrate_ma_allowed"}
    ),
}
#: the launch-configuration field ``initdata_digest`` stands for: give one of the two
INITDATA_FIELD = {TeeKind.TDX: "mr_config_id", TeeKind.SNP: "host_data"}
#: a profile must pin at least one of these (a policy that accepts any code is not a policy)
IDENTITY = {
    TeeKind.SGX: ("mrenclave", "mrsigner"),
    TeeKind.TDX: ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"),
    TeeKind.SNP: ("measurement", "host_data", "initdata_digest"),
}
#: the measurement of the code itself, which a profile must pin (RTMRs, HOST_DATA or initdata
#: alone are set or extended by whoever launches the VM: with the launch measurement "any", a VM
#: of other firmware and kernel that reproduces them would pass)
PINNED = {TeeKind.TDX: "mrtd", TeeKind.SNP: "measurement"}
#: SEV-SNP guest policy bits a profile may require (``NAME = false``: the bit must be clear)
SNP_POLICY_BITS = {"smt_allowed": 16, "migrate_ma_allowed": 18}
#: initdata digest algorithms (the initdata document's ``algorithm``) -> digest length
INITDATA_ALGORITHMS = {"sha256": 32, "sha384": 48, "sha512": 64}
TCB_PARTS = ("bl", "tee", "snp", "ucode", "fmc")
Value = tuple[bytes, ...] | int | dict[str, int] | str


def version_key(version: str, *, vbios: bool = False) -> tuple[int, ...]:
    """``550.90.07`` -> (550, 90, 7); a VBIOS version's groups are hex (``96.00.9F.00.01``)."""
    try:
        return tuple(int(p, 16 if vbios else 10) for p in version.split("."))
    except ValueError:
        raise PolicyError(f"{version!r} is not a dotted version") from None


@dataclass(frozen=True)
class GpuRequirement:
    """``[profile.gpu]``: the NVIDIA GPUs a profile requires beside its CPU evidence."""

    count: int
    driver_versions: tuple[str, ...] | None  # None = any
    vbios_versions: tuple[str, ...] | None
    min_driver_version: str | None = None
    min_vbios_version: str | None = None
    archs: frozenset[str] | None = None
    rim_required: bool = True
    rim_ids: frozenset[str] | None = None
    ocsp_required: bool = True
    ocsp_allow_cached: bool = False
    ocsp_max_age: int | None = None


@dataclass(frozen=True)
class Profile:
    """One accepted configuration. ``refs`` maps each reference field to its value or ``"any"``."""

    tee: TeeKind
    refs: dict[str, Value]
    workload_digests: tuple[str, ...] | None  # None = any
    tcb_statuses: frozenset[TcbStatus]
    advisory_ids: frozenset[str] | None  # None = any
    insecure: frozenset[str] = frozenset()
    description: str = ""
    #: the oldest Intel collateral accepted (its tcbEvaluationDataNumber); None = any
    min_tcb_evaluation_data_number: int | None = None
    #: NVIDIA GPUs required beside the CPU evidence (``[profile.gpu]``); None = no GPU section
    gpu: GpuRequirement | None = None


@dataclass(frozen=True)
class Policy:
    """A release policy: accepted when any profile matches."""

    profiles: tuple[Profile, ...]
    source: str = field(default="", compare=False)

    @classmethod
    def from_toml(cls, text: str, name: str = "policy") -> Policy:
        if len(text) > MAX_POLICY:
            raise PolicyError(f"{name}: policy larger than {MAX_POLICY} bytes")
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"{name}: not valid TOML: {e}") from e
        return cls.from_dict(doc, name, source=text)

    @classmethod
    def from_dict(cls, doc: dict[str, Any], name: str = "policy", source: str = "") -> Policy:
        unknown = set(doc) - {"version", "profile"}
        if unknown:
            raise PolicyError(
                f"{name}: unknown top-level field(s): {', '.join(sorted(unknown))}",
                hint=unknown_fields_hint(unknown, {"version", "profile"}),
            )
        if doc.get("version", 1) != 1:
            raise PolicyError(f"{name}: unsupported policy version {doc.get('version')!r}")
        profiles = doc.get("profile")
        if not isinstance(profiles, list) or not profiles:
            raise PolicyError(
                f"{name}: a policy needs at least one [[profile]]",
                hint="an empty policy would accept nothing, or everything; neither is meant",
            )
        return cls(
            tuple(_profile(p, f"{name}: profile {i + 1}") for i, p in enumerate(profiles)), source
        )


def _profile(p: Any, where: str) -> Profile:
    if not isinstance(p, dict):
        raise PolicyError(f"{where}: must be a table")
    try:
        tee = TeeKind(str(p.get("tee")))
    except ValueError:
        raise PolicyError(f"{where}: tee must be one of sgx, tdx, snp") from None
    fields = FIELDS[tee]
    extra = {UNCHECKED_REVOCATION} if tee is TeeKind.SNP else {MIN_EVALUATION}
    unknown = set(p) - COMMON - set(fields) - extra
    if unknown:
        raise PolicyError(
            f"{where}: unknown field(s) for {tee}: {', '.join(sorted(unknown))}",
            hint=unknown_fields_hint(unknown, set(fields) | COMMON | extra),
        )
    launch = INITDATA_FIELD.get(tee)
    if launch is not None and launch in p and "initdata_digest" in p:
        raise PolicyError(
            f"{where}: initdata_digest is the value expected in {launch}: give one of them",
            hint=f"initdata_digest pins {launch}; drop {launch} (or initdata_digest)",
        )
    optional = OPTIONAL[tee] | ({"initdata_digest", launch} if launch else set())
    missing = [f for f in (*fields, "workload_digest") if f not in p and f not in optional]
    if launch is not None and launch not in p and "initdata_digest" not in p:
        missing.append(f"{launch} (or initdata_digest)")
    if missing:
        raise PolicyError(
            f'{where}: every field must be set (use "any" to skip one): missing {", ".join(missing)}'
        )
    refs = {
        f: _value(p[f], kind, size, f"{where}: {f}") for f, (kind, size) in fields.items() if f in p
    }
    refs.update({f: ANY for f in fields if f not in p and f != "initdata_digest"})
    if all(refs.get(f, ANY) == ANY for f in IDENTITY[tee]):
        raise PolicyError(
            f"{where}: pins none of {', '.join(IDENTITY[tee])}",
            hint="a profile must name the code it accepts",
        )
    pinned = PINNED.get(tee)
    if pinned is not None and refs.get(pinned, ANY) == ANY:
        raise PolicyError(
            f'{where}: {pinned} must be pinned for {tee} (not "any")',
            hint=f"{pinned} measures the code the {tee} VM launched with; the other fields "
            "are set or extended by whoever launches it: `shieldml attest verify --json` shows it",
        )
    insecure = frozenset(
        k for k in (*INSECURE, UNCHECKED_REVOCATION) if _bool(p.get(k, False), f"{where}: {k}")
    )
    statuses = _statuses(p.get("tcb_status", ["UpToDate"]), where)
    if statuses & OUT_OF_DATE and "insecure_allow_out_of_date" not in insecure:
        raise PolicyError(
            f"{where}: accepting an out-of-date TCB needs insecure_allow_out_of_date = true"
        )
    if (
        tee is TeeKind.SNP
        and refs["min_reported_tcb"] == ANY
        and "insecure_allow_out_of_date" not in insecure
    ):
        raise PolicyError(
            f'{where}: min_reported_tcb = "any" needs insecure_allow_out_of_date = true'
        )
    digests = p["workload_digest"]
    wd = None if digests == ANY else tuple(_strings(digests, f"{where}: workload_digest"))
    adv = p.get("advisory_ids", [])
    advisories = (
        None if adv == ANY else frozenset(_strings(adv, f"{where}: advisory_ids", allow_empty=True))
    )
    desc = p.get("description", "")
    if not isinstance(desc, str):
        raise PolicyError(f"{where}: description must be a string")
    min_eval = p.get(MIN_EVALUATION)
    if min_eval is not None and (
        not isinstance(min_eval, int) or isinstance(min_eval, bool) or min_eval < 0
    ):
        raise PolicyError(f"{where}: {MIN_EVALUATION} must be a non-negative integer")
    gpu = None
    if "gpu" in p:
        if tee is TeeKind.SGX:
            raise PolicyError(
                f"{where}: [profile.gpu] needs a confidential VM (tee = tdx or snp)",
                hint="an SGX enclave cannot own a GPU; NVIDIA CC GPUs attach to TDX/SEV-SNP VMs",
            )
        gpu = _gpu(p["gpu"], f"{where}: gpu")
    return Profile(
        tee,
        refs,
        wd,
        statuses,
        advisories,
        insecure,
        desc,
        min_tcb_evaluation_data_number=min_eval,
        gpu=gpu,
    )


def _gpu(g: Any, where: str) -> GpuRequirement:
    if not isinstance(g, dict):
        raise PolicyError(f"{where}: must be a table ([profile.gpu])")
    unknown = set(g) - GPU_FIELDS
    if unknown:
        raise PolicyError(
            f"{where}: unknown field(s): {', '.join(sorted(unknown))}",
            hint=unknown_fields_hint(unknown, GPU_FIELDS),
        )
    missing = [f for f in ("count", "driver_version", "vbios_version") if f not in g]
    if missing:
        raise PolicyError(
            f'{where}: every field must be set (use "any" to skip one): missing {", ".join(missing)}'
        )
    count = g["count"]
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_GPUS:
        raise PolicyError(f"{where}: count must be an integer from 1 to {MAX_GPUS}")
    if g.get("cc_mode", "on") != "on":
        raise PolicyError(
            f'{where}: cc_mode must be "on"',
            hint="a GPU outside confidential-computing mode lets the host read its memory",
        )

    def versions(name: str) -> tuple[str, ...] | None:
        v = g[name]
        if v == ANY:
            return None
        out = tuple(_strings(v, f"{where}: {name}"))
        for x in out:
            version_key(x, vbios=name.startswith("vbios"))
        return out

    def minimum(name: str) -> str | None:
        v = g.get(name)
        if v is None:
            return None
        if not isinstance(v, str):
            raise PolicyError(f"{where}: {name} must be a version string")
        version_key(v, vbios=name.startswith("min_vbios"))
        return v

    archs = None
    if "arch" in g and g["arch"] != ANY:
        archs = frozenset(_strings(g["arch"], f"{where}: arch"))
        if archs - set(GPU_ARCHS):
            raise PolicyError(f"{where}: arch must be among {', '.join(GPU_ARCHS)}")
    rim_ids = None
    if "rim_ids" in g and g["rim_ids"] != ANY:
        rim_ids = frozenset(_strings(g["rim_ids"], f"{where}: rim_ids"))
    ocsp = g.get("ocsp", "required")
    if ocsp not in ("required", "not-required"):
        raise PolicyError(f'{where}: ocsp must be "required" or "not-required"')
    max_age = g.get("ocsp_max_age")
    if max_age is not None and (
        not isinstance(max_age, int) or isinstance(max_age, bool) or max_age < 0
    ):
        raise PolicyError(f"{where}: ocsp_max_age must be a number of seconds")
    rim_required = _bool(g.get("rim_required", True), f"{where}: rim_required")
    if rim_ids is not None and not rim_required:
        raise PolicyError(f"{where}: rim_ids needs rim_required = true")
    return GpuRequirement(
        count=count,
        driver_versions=versions("driver_version"),
        vbios_versions=versions("vbios_version"),
        min_driver_version=minimum("min_driver_version"),
        min_vbios_version=minimum("min_vbios_version"),
        archs=archs,
        rim_required=rim_required,
        rim_ids=rim_ids,
        ocsp_required=ocsp == "required",
        ocsp_allow_cached=_bool(g.get("ocsp_allow_cached", False), f"{where}: ocsp_allow_cached"),
        ocsp_max_age=max_age,
    )


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise PolicyError(f"{where}: must be true or false")
    return v


def _strings(v: Any, where: str, *, allow_empty: bool = False) -> list[str]:
    items = [v] if isinstance(v, str) else v
    if (
        not isinstance(items, list)
        or not all(isinstance(x, str) and x for x in items)
        or (not items and not allow_empty)
    ):
        raise PolicyError(f'{where}: must be a string, a non-empty list of strings, or "any"')
    return items


def _statuses(v: Any, where: str) -> frozenset[TcbStatus]:
    out = set()
    for s in _strings(v, f"{where}: tcb_status"):
        try:
            st = TcbStatus(s)
        except ValueError:
            raise PolicyError(
                f"{where}: unknown TCB status {s!r}",
                hint=f"one of {', '.join(t.value for t in TcbStatus)}",
            ) from None
        if st is TcbStatus.REVOKED:
            raise PolicyError(f"{where}: a Revoked TCB can never be accepted")
        out.add(st)
    return frozenset(out)


def _value(v: Any, kind: str, size: int, where: str) -> Value:
    if v == ANY:
        return ANY
    if kind == "int":
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise PolicyError(f'{where}: must be a non-negative integer or "any"')
        return v
    if kind == "bool":
        if not isinstance(v, bool):
            raise PolicyError(f'{where}: must be true, false or "any"')
        return int(v)
    if kind == "tcb":
        if (
            not isinstance(v, dict)
            or not v
            or set(v) - set(TCB_PARTS)
            or not all(isinstance(x, int) and 0 <= x < 256 for x in v.values())
        ):
            raise PolicyError(
                f'{where}: must be a table of {", ".join(TCB_PARTS)} (0-255) or "any"'
            )
        return dict(v)
    if kind == "initdata":
        return tuple(initdata_field(s, size, where) for s in _strings(v, where))
    values = []
    for s in _strings(v, where):
        try:
            raw = bytes.fromhex(s.removeprefix("0x"))
        except ValueError:
            raise PolicyError(f"{where}: {s!r} is not hex") from None
        if len(raw) != size:
            raise PolicyError(f"{where}: {s!r} has {len(raw)} bytes, expected {size}")
        values.append(raw)
    return tuple(values)


def initdata_field(digest: str, size: int, where: str = "initdata_digest") -> bytes:
    """The bytes a VM launched with this initdata digest reports in a ``size``-byte field.

    Confidential Containers' initdata convention: the digest goes into TDX ``MRCONFIGID`` (48
    bytes) or SEV-SNP ``HOST_DATA`` (32 bytes), padded with zero bytes at the end when shorter,
    cut at the end when longer (SHA-384 on SEV-SNP keeps its first 32 bytes).
    """
    algorithm, sep, hexpart = digest.partition(":")
    want = INITDATA_ALGORITHMS.get(algorithm.lower().replace("-", ""))
    if not sep or want is None:
        raise PolicyError(
            f"{where}: {digest!r} is not ALGORITHM:HEX",
            hint=f"algorithm one of {', '.join(INITDATA_ALGORITHMS)} (the initdata's `algorithm`)",
        )
    try:
        raw = bytes.fromhex(hexpart)
    except ValueError:
        raise PolicyError(f"{where}: {digest!r} is not hex after the algorithm") from None
    if len(raw) != want:
        raise PolicyError(f"{where}: a {algorithm} digest has {want} bytes, not {len(raw)}")
    return raw[:size].ljust(size, b"\0")


def initdata_digest(document: bytes, algorithm: str | None = None) -> str:
    """``ALGORITHM:HEX`` of an initdata document (the TOML bytes exactly as given to the VM).

    ``algorithm`` defaults to the document's own top-level ``algorithm`` field (``sha384`` when
    it has none); the digest is taken over the whole document, as Confidential Containers does.
    """
    if algorithm is None:
        try:
            algorithm = str(tomllib.loads(document.decode("utf-8")).get("algorithm", "sha384"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise PolicyError(f"initdata is not valid TOML: {e}") from e
    name = algorithm.lower().replace("-", "")
    if name not in INITDATA_ALGORITHMS:
        raise PolicyError(
            f"initdata algorithm {algorithm!r} is not one of {', '.join(INITDATA_ALGORITHMS)}"
        )
    return f"{name}:{hashlib.new(name, document).hexdigest()}"
