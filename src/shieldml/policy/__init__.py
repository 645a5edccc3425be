"""Release policies: "is this genuine TEE what the owner expects?" -> a Verdict.

Policies are TOML data (see :mod:`shieldml.policy._model`), deny by default, evaluate every clause
of every profile and report all failures at once. They consume only verified
:class:`shieldml.attest.Claims`.
"""

from shieldml.policy._model import (
    ANY,
    FIELDS,
    GPU_FIELDS,
    MIN_EVALUATION,
    OPTIONAL,
    Policy,
    Profile,
    initdata_digest,
    initdata_field,
    version_key,
)
from shieldml.policy._verdict import (
    PolicyCheck,
    ProfileResult,
    Verdict,
    evaluate,
    listed_gpu_problems,
    require,
)

__all__ = [
    "ANY",
    "FIELDS",
    "GPU_FIELDS",
    "MIN_EVALUATION",
    "OPTIONAL",
    "Policy",
    "PolicyCheck",
    "Profile",
    "ProfileResult",
    "Verdict",
    "evaluate",
    "initdata_digest",
    "initdata_field",
    "listed_gpu_problems",
    "require",
    "version_key",
]
