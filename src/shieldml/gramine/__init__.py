"""SGX with Gramine: a Gramine manifest for a shieldml job, release policies from a SIGSTRUCT.

- :func:`gramine_manifest` writes the manifest that runs ``shieldml run`` inside a Gramine
  enclave, with the job's trusted files and RA-TLS secret provisioning (:mod:`.manifest`);
- :class:`Sigstruct` parses a signed enclave's SIGSTRUCT (``.sig``) for the MRENCLAVE, MRSIGNER,
  ISV product id and SVN a policy pins (:mod:`.sigstruct`).
"""

from __future__ import annotations

from shieldml.gramine.manifest import gramine_manifest
from shieldml.gramine.sigstruct import Sigstruct

__all__ = ["Sigstruct", "gramine_manifest"]
