"""The normalised result of verifying evidence from any TEE.

Only the verifiers in this package construct :class:`Claims`, and only after every check passed:
an unverified :class:`~shieldml.attest.Quote` or ``SnpReport`` never becomes Claims.
"""

from __future__ import annotations

import enum
from dataclasses import Field, dataclass, fields
from datetime import UTC, datetime
from typing import Any, ClassVar

from shieldml.attest._checks import Check
from shieldml.attest._tee import TeeKind
from shieldml.attest._trust import RootKind


class TcbStatus(enum.StrEnum):
    """Intel's TCB statuses (QVL), the order of the enum is not meaningful."""

    UP_TO_DATE = "UpToDate"
    SW_HARDENING_NEEDED = "SWHardeningNeeded"
    CONFIGURATION_NEEDED = "ConfigurationNeeded"
    CONFIGURATION_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
    OUT_OF_DATE = "OutOfDate"
    OUT_OF_DATE_CONFIGURATION_NEEDED = "OutOfDateConfigurationNeeded"
    TD_RELAUNCH_ADVISED = "TDRelaunchAdvised"
    TD_RELAUNCH_ADVISED_CONFIGURATION_NEEDED = "TDRelaunchAdvisedConfigurationNeeded"
    REVOKED = "Revoked"


def iso_utc(t: datetime) -> str:
    """``t`` in UTC, ISO 8601 to the second: ``2025-07-01T00:00:00Z``. A naive ``t`` is taken as
    UTC already. The one form claims, receipts, collateral and messages write times in."""
    if t.tzinfo is not None:
        t = t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return iso_utc(value)
    return value


class _Dict:
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # set by @dataclass on each subclass

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True, kw_only=True)
class SgxMeasurements(_Dict):
    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    attributes: bytes
    misc_select: int
    config_id: bytes
    config_svn: int
    isv_ext_prod_id: bytes
    isv_family_id: bytes


@dataclass(frozen=True, kw_only=True)
class TdxMeasurements(_Dict):
    mrtd: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    td_attributes: bytes
    xfam: bytes
    sept_ve_disable: bool
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    tee_tcb_svn: bytes
    tee_tcb_svn2: bytes | None
    mr_service_td: bytes | None


@dataclass(frozen=True, kw_only=True)
class SnpMeasurements(_Dict):
    measurement: bytes
    host_data: bytes
    guest_policy: int
    vmpl: int
    guest_svn: int
    family_id: bytes
    image_id: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    reported_tcb: int
    signing_key: str  # "vcek" or "vlek"


Measurements = SgxMeasurements | TdxMeasurements | SnpMeasurements


@dataclass(frozen=True, kw_only=True)
class Claims:
    """Verified facts about a TEE: genuine hardware at a TCB level, with its measurements.

    Verification does not judge acceptability: ``debug``, TD attributes and the TCB status are
    reported here for the policy to decide.
    """

    tee: TeeKind
    tcb_status: TcbStatus | None  # None for SEV-SNP: AMD publishes no status; see reported_tcb
    advisory_ids: tuple[str, ...]
    debug: bool
    report_data: bytes
    measurements: Measurements
    platform: dict[str, str]
    root: RootKind  # the weakest root any chain of the evidence or its collateral ended at
    verified_at: datetime
    checks: tuple[Check, ...]
    #: Intel: the collateral's tcbEvaluationDataNumber (the lower of the TCB info's and the QE
    #: identity's); None for SEV-SNP
    tcb_evaluation_data_number: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "genuine": True,
            "tee": self.tee.value,
            "tcb_status": self.tcb_status.value if self.tcb_status else None,
            "advisory_ids": list(self.advisory_ids),
            "debug": self.debug,
            "measurements": self.measurements.to_dict(),
            "report_data": self.report_data.hex(),
            "platform": dict(self.platform),
            "root": self.root.value,
            "tcb_evaluation_data_number": self.tcb_evaluation_data_number,
            "verified_at": _plain(self.verified_at),
            "reasons": [c.detail for c in self.checks],
        }
