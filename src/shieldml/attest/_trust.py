"""Trust anchors: the vendor roots pinned in code, plus explicitly added simulated or custom roots.

A root certificate that arrives with evidence or collateral is trusted only when its SHA-256
fingerprint is pinned here (or was added on purpose). A custom root needs ``insecure=True`` and is
reported in every result; the simulated platform's root is trusted only when added explicitly.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from shieldml.attest import _certs
from shieldml.errors import FormatError, TrustRootError, UntrustedRootError

log = logging.getLogger("shieldml.attest")

#: Intel SGX Root CA ("CN=Intel SGX Root CA, O=Intel Corporation"), valid to 2049-12-31.
INTEL_SGX_ROOT_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
#: AMD Root Keys (ARK) per product generation.
AMD_ARK_SHA256 = {
    "Milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "Genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "Turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
}
#: "NVIDIA Device Identity CA" (O=NVIDIA, P-384, valid 2021-11-05 .. 9999-12-31): the root of
#: every NVIDIA GPU (Hopper, Blackwell) and NVSwitch (LS10) device-identity chain.
NVIDIA_DEVICE_ROOT_SHA256 = "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48"
#: "NVIDIA CoRIM signing Root CA" (valid 2023-03-16 .. 2053-03-08): the root of the certificates
#: that sign NVIDIA's reference integrity manifests (RIMs: driver and VBIOS golden measurements).
NVIDIA_RIM_ROOT_SHA256 = "12977b5115acb0381179279fffeb5a8c4d264971ebb32298023a465fa41df5d1"


class Vendor(enum.StrEnum):
    INTEL = "intel"
    AMD = "amd"
    NVIDIA = "nvidia"  # device identity (GPU attestation reports)
    NVIDIA_RIM = "nvidia-rim"  # RIM signing: a separate root, never accepted for devices


class RootKind(enum.StrEnum):
    """How the root of a verified chain came to be trusted."""

    VENDOR = "vendor"  # pinned in code
    SIMULATED = "simulated"  # shieldml's simulated hardware, added explicitly
    CUSTOM = "custom"  # added with insecure=True


#: weakest first: a result is only as trusted as the weakest root any of its chains ended at
_STRENGTH = (RootKind.SIMULATED, RootKind.CUSTOM, RootKind.VENDOR)


def weakest(*kinds: RootKind) -> RootKind:
    """The least trusted of ``kinds`` (simulated < custom < vendor)."""
    return min(kinds, key=_STRENGTH.index)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class TrustAnchors:
    """The roots verification may end in, by vendor."""

    vendor: dict[Vendor, frozenset[str]] = field(
        default_factory=lambda: {
            Vendor.INTEL: frozenset({INTEL_SGX_ROOT_SHA256}),
            Vendor.AMD: frozenset(AMD_ARK_SHA256.values()),
            Vendor.NVIDIA: frozenset({NVIDIA_DEVICE_ROOT_SHA256}),
            Vendor.NVIDIA_RIM: frozenset({NVIDIA_RIM_ROOT_SHA256}),
        }
    )
    simulated: frozenset[str] = frozenset()
    custom: frozenset[str] = frozenset()

    def key(self) -> str:
        """A stable identity of these anchors (part of every cached verification result)."""
        parts = [f"{v}:{','.join(sorted(fps))}" for v, fps in sorted(self.vendor.items())]
        parts += [
            "sim:" + ",".join(sorted(self.simulated)),
            "custom:" + ",".join(sorted(self.custom)),
        ]
        return ";".join(parts)

    def with_simulated(self, root: x509.Certificate) -> TrustAnchors:
        """Also trust a simulated platform's root (results say ``root: simulated``)."""
        return replace(self, simulated=self.simulated | {fingerprint(root)})

    def with_custom(self, root: x509.Certificate, *, insecure: bool) -> TrustAnchors:
        """Also trust an arbitrary root: only with ``insecure=True``, and logged on every use."""
        if not insecure:
            raise ValueError("a custom trust root requires insecure=True")
        log.warning("insecure: trusting custom root %s", fingerprint(root))
        return replace(self, custom=self.custom | {fingerprint(root)})

    def classify(self, root: x509.Certificate, vendor: Vendor, what: str) -> RootKind:
        """How ``root`` is trusted for ``vendor``'s evidence; :class:`UntrustedRootError` if not."""
        fp = fingerprint(root)
        if fp in self.vendor.get(vendor, frozenset()):
            return RootKind.VENDOR
        if fp in self.simulated:
            return RootKind.SIMULATED
        if fp in self.custom:
            log.warning("insecure: %s verified against custom root %s", what, fp)
            return RootKind.CUSTOM
        subject = root.subject.rfc4514_string()
        # the name only words the message; it never decides trust (see anchors_from_files)
        simulated = "shieldml simulated" in subject
        raise UntrustedRootError(
            "trust root",
            f"{what} chains to an untrusted root" + (" (simulated)" if simulated else ""),
            expected=f"a pinned {vendor} root",
            found=f"{subject} (SHA-256 {fp})",
            hint="simulated evidence verifies only when its platform is trusted explicitly "
            "(--simulated-platform)"
            if simulated
            else "evidence must chain to the genuine vendor root; a custom root needs --insecure-custom-root",
        )


def anchors_from_files(
    paths: tuple[str, ...] | list[str], *, insecure_custom_root: bool = False
) -> TrustAnchors:
    """The pinned anchors plus the roots in ``paths`` (PEM or DER files).

    A pinned vendor root adds nothing; any other root is a *custom* root, trusted only with
    ``insecure_custom_root`` (and logged). What a certificate says about itself never decides how
    it is trusted: one named like the simulated platform's (``O=shieldml simulated``) is a custom
    root too; a simulated platform's roots are trusted as simulated only through
    :meth:`shieldml.testing.simulated.SimulatedPlatform.trust` (``--simulated-platform``). A file
    that cannot be read or is not a certificate, or a custom root without the switch, is a
    :class:`TrustRootError`.
    """
    from shieldml.attest._snp import load_certificate

    anchors = TrustAnchors()
    for path in paths:
        try:
            with Path(path).open("rb") as f:
                data = f.read(1 << 20)
            certs = (
                _certs.pem_certificates(data) if b"-----BEGIN" in data else [load_certificate(data)]
            )
        except OSError as e:
            raise TrustRootError(f"{path}: cannot read trust root: {e.strerror}") from e
        except (ValueError, FormatError) as e:
            raise TrustRootError(f"{path}: not a certificate") from e
        for cert in certs:
            if any(fingerprint(cert) in fps for fps in anchors.vendor.values()):
                continue  # a pinned vendor root is trusted anyway
            elif not insecure_custom_root:
                raise TrustRootError(
                    f"{path}: '{cert.subject.rfc4514_string()}' is not a pinned vendor root",
                    hint="a custom root needs --insecure-custom-root (and is reported in every result)",
                )
            else:
                anchors = anchors.with_custom(cert, insecure=True)
    return anchors
