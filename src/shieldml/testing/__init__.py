"""Test machinery shipped with shieldml: **not for production**.

- :mod:`shieldml.testing.simulated`: a simulated TEE platform (its own Intel- and AMD-shaped roots,
  PCK/VCEK certificates, collateral and quotes). Evidence from it verifies only against its own
  root, which a verifier trusts only when told to (``--simulated-platform``) and a policy accepts
  only with ``allow_simulated = true``. It stands in for hardware in the demo, the tests and the
  examples.
- :mod:`shieldml.testing.simulated_gpu`: simulated NVIDIA confidential-computing GPUs (their own
  device and RIM roots, SPDM reports, OCSP responses, signed RIMs), a family of them kept in a
  simulated platform's directory; :mod:`shieldml.testing.simulated_nvml` answers NVML's calls
  for them (``tee = "simulated"`` jobs with ``[gpu]``).
- :mod:`shieldml.testing.brokers`: key broker processes on loopback.

Nothing in the rest of shieldml imports this package except where a user asks for the simulated
TEE by name (``tee = "simulated"``, ``--simulated-platform``).
"""

from __future__ import annotations

from shieldml.testing.brokers import BrokerProcess, free_port, start_broker
from shieldml.testing.simulated import SimulatedPlatform, fixed_clock, system_clock

__all__ = [
    "BrokerProcess",
    "SimulatedPlatform",
    "fixed_clock",
    "free_port",
    "start_broker",
    "system_clock",
]
