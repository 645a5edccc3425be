"""What several command groups share: exit codes, options, reading inputs, verifying evidence."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from shieldml.attest import DEPRECATED_TEE_NAMES, TEE_NAMES, canonical_tee
from shieldml.cli._output import invocation
from shieldml.errors import (
    AttestationError,
    CollateralError,
    FormatError,
    PolicyError,
    ShieldError,
)
from shieldml.files import Format

if TYPE_CHECKING:  # loaded where used: `shieldml decrypt` loads no verifier and no policy code
    from shieldml.attest import Check, Claims, GpuClaims, TrustAnchors
    from shieldml.policy import Policy

# The exit codes of every command (main() is the only place that maps errors to them).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTEGRITY = 3
#: ``shieldml run``: the runner itself failed (``--runner-exit-code`` picks another)
EXIT_RUNNER = 125
EXIT_INTERRUPTED = 130

#: what each exit code means (the CLI's docstring and docs/cli.md say the same)
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "an error in the input, a key or the environment; also evidence that is not "
    "genuine, a policy that denies, an audit chain that is broken",
    EXIT_USAGE: "usage error (a missing or malformed option or argument)",
    EXIT_INTEGRITY: "integrity failure (a protected file failed authentication or a key does "
    "not match)",
    EXIT_RUNNER: "`shieldml run` only: the runner failed (keys refused, the program not started"
    " or its outputs not sealed, a usage error, an interruption before the program started);"
    " every other code of `shieldml run` is the program's own; `--runner-exit-code N` picks"
    " another",
    EXIT_INTERRUPTED: "interrupted",
}

F = TypeVar("F", bound=Callable[..., Any])


class TeeName(click.Choice[str]):
    """``--tee``: one of the canonical TEE names (``sgx``, ``tdx``, ``snp``, and ``auto`` or
    ``simulated`` where they apply); an older spelling (``gramine``, ``ratls``) is taken as the
    name it means, with a warning on standard error."""

    def __init__(self, *modes: str) -> None:
        super().__init__([*modes, *TEE_NAMES])

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value in DEPRECATED_TEE_NAMES:
            where = f"--{param.name}" if param is not None and param.name else "--tee"
            return canonical_tee(value, where)
        return super().convert(value, param, ctx)


#: an option or argument that names a file that must exist
EXISTING_FILE = click.Path(exists=True, dir_okay=False)

FORMAT_CHOICE = click.Choice([f.value for f in Format])


def _json_flag(_ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:  # main() prints the command's errors as JSON too
        invocation().as_json = True
    return value


#: the callback of every ``--json``
JSON_OPTION_CALLBACK = _json_flag


#: ``--json``: eager, so that main() knows of it even when a later option fails to parse
JSON_OPTION = click.option(
    "--json",
    "as_json",
    is_flag=True,
    is_eager=True,
    callback=JSON_OPTION_CALLBACK,
    help="Machine-readable output: the result as JSON on stdout; an error as one JSON object on"
    " one line of stderr.",
)
AT_OPTION = click.option("--at", help="Verification time, ISO 8601 (default: now).")


def read_bytes(path: str, what: str) -> bytes:
    """The content of ``path``; a :class:`ShieldError` naming ``what`` if it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ShieldError(f"{path}: cannot read {what}: {e.strerror}") from e


def parse_time(value: str | None) -> datetime:
    """``--at``: an ISO 8601 time (UTC unless it names a zone); now when absent."""
    if value is None:
        return datetime.now(UTC)
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 time: {value!r}", param_hint="--at") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def trust_anchors(roots: tuple[str, ...], insecure_custom_root: bool) -> TrustAnchors:
    """The pinned vendor roots plus ``--trust-root`` files."""
    from shieldml.attest import anchors_from_files

    return anchors_from_files(roots, insecure_custom_root=insecure_custom_root)


def read_policy(path: str) -> tuple[str, Policy]:
    """A release policy's TOML text and the policy it validates into."""
    from shieldml.policy import Policy

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"{path}: cannot read policy: {e}") from e
    return text, Policy.from_toml(text, path)


def load_policy(path: str) -> Policy:
    """A release policy from a TOML file."""
    return read_policy(path)[1]


def trust_root_options(f: F) -> F:
    """``--trust-root`` (repeatable) and ``--insecure-custom-root``."""
    f = click.option(
        "--insecure-custom-root",
        is_flag=True,
        help="Allow --trust-root certificates that are not vendor roots.",
    )(f)
    return click.option(
        "--trust-root",
        multiple=True,
        type=EXISTING_FILE,
        help="Extra root certificate.",
    )(f)


def simulated_platform_option(f: F) -> F:
    """``--simulated-platform DIR``: trust a simulated platform's root (tests, demo)."""
    return click.option(
        "--simulated-platform",
        type=click.Path(file_okay=False),
        help="Trust this simulated platform (tests, demo); the policy must still allow simulated"
        " evidence.",
    )(f)


def receipt_trust(
    roots: tuple[str, ...],
    insecure_custom_root: bool,
    simulated_platform: str | None,
    when: datetime,
) -> TrustAnchors:
    """The anchors a receipt's evidence is verified against; the simulated platform's root only
    when asked for by name (only then is the test machinery loaded)."""
    anchors = trust_anchors(roots, insecure_custom_root)
    if simulated_platform:
        from shieldml.testing.simulated import SimulatedPlatform, fixed_clock

        anchors = SimulatedPlatform.open(simulated_platform, clock=fixed_clock(when)).trust(anchors)
    return anchors


GPU_TEE = "nvidia-gpu"


def evidence_options(f: F) -> F:
    """FILE and the options of :func:`verify` (``attest verify|explain``, ``policy eval``)."""
    return _evidence_options(f, ())


def attest_evidence_options(f: F) -> F:
    """:func:`evidence_options` plus NVIDIA GPU evidence (``--tee nvidia-gpu``: ``attest``)."""
    for opt in reversed(
        [
            click.option(
                "--nonce",
                help="nvidia-gpu: the 32-byte nonce (hex) the report must answer.",
            ),
            click.option(
                "--ocsp",
                type=EXISTING_FILE,
                multiple=True,
                help="nvidia-gpu: an OCSP response (DER) for the device or RIM chain; repeatable."
                " Without any, revocation is not checked (the claims say so).",
            ),
            click.option(
                "--rim",
                type=EXISTING_FILE,
                multiple=True,
                help="nvidia-gpu: a driver or VBIOS RIM (SWID XML); repeatable. With RIMs every"
                " active golden measurement must match.",
            ),
        ]
    ):
        f = opt(f)
    return _evidence_options(f, (GPU_TEE,))


def _evidence_options(f: F, tees: tuple[str, ...]) -> F:
    f = trust_root_options(f)
    for opt in reversed(
        [
            click.argument("file", type=EXISTING_FILE),
            click.option(
                "--tee",
                type=TeeName("auto", *tees),
                default="auto",
                show_default=True,
                help="Which TEE made the evidence (sgx reads a DCAP quote or an RA-TLS"
                " certificate carrying one"
                + ("; nvidia-gpu an NVIDIA GPU's SPDM report)." if tees else ")."),
            ),
            click.option(
                "--collateral",
                type=EXISTING_FILE,
                help="Intel collateral JSON.",
            ),
            click.option(
                "--vcek",
                type=EXISTING_FILE,
                help="SEV-SNP VCEK/VLEK (DER or PEM), or the extended report's certificate table.",
            ),
            click.option(
                "--cert-chain",
                type=EXISTING_FILE,
                help="AMD ASK/ARK chain (PEM); nvidia-gpu: the device certificate chain (PEM,"
                " leaf first) when FILE is the report's hex text.",
            ),
            click.option(
                "--amd-crl",
                type=EXISTING_FILE,
                help="AMD's CRL for the product (KDS /vcek/v1/PRODUCT/crl, DER or PEM); without it"
                " SEV-SNP revocation is not checked (the claims say so).",
            ),
            AT_OPTION,
        ]
    ):
        f = opt(f)
    return f


class NotGenuine(Exception):  # noqa: N818 - a verdict, like PolicyDenied
    """:func:`verify` refused the evidence; ``error`` says which check failed and why."""

    def __init__(self, error: AttestationError | FormatError) -> None:
        super().__init__(error.message)
        self.error = error

    @property
    def failed_check(self) -> str:
        """The name of the check that failed (``format``: the evidence does not parse)."""
        return self.error.check if isinstance(self.error, AttestationError) else "format"

    @property
    def checks(self) -> list[Check]:
        """The checks run up to the failure (the failed one last); none if it did not parse."""
        return list(self.error.checks) if isinstance(self.error, AttestationError) else []


def verify(
    *,
    file: str,
    tee: str,
    collateral: str | None,
    vcek: str | None,
    cert_chain: str | None,
    at: str | None,
    trust_root: tuple[str, ...],
    insecure_custom_root: bool,
    amd_crl: str | None = None,
) -> Claims:
    """Verify the evidence in ``file`` with the options of :func:`evidence_options`.

    Raises :class:`NotGenuine` if the evidence is refused; inputs that cannot be read or parsed
    (the evidence file, collateral, a certificate chain) raise their :class:`ShieldError`.
    """
    from shieldml.attest import (
        IntelCollateral,
        TrustStore,
        is_certificate,
        load_pem_chain,
        verify_evidence,
    )

    data = read_bytes(file, "evidence")
    if tee == "sgx" and is_certificate(data):  # an SGX quote inside an RA-TLS certificate
        tee = "ratls"
    col = None
    if collateral:
        col = IntelCollateral.from_json(read_bytes(collateral, "collateral"))
    chain = None
    if cert_chain:
        pem = read_bytes(cert_chain, "certificate chain")
        start = pem.find(b"-----BEGIN")  # text before the first certificate is no part of it
        try:
            chain = load_pem_chain(pem[start:] if start > 0 else pem, cert_chain)
        except CollateralError as e:
            raise ShieldError(f"{cert_chain}: not a PEM certificate chain") from e
    elif vcek:
        chain = TrustStore().certificates() or None  # ASK/ARK from `shieldml trust import|fetch`
    vcek_bytes = read_bytes(vcek, "VCEK") if vcek else None
    when = parse_time(at)
    try:
        return verify_evidence(
            data,
            tee=tee,
            collateral=col,
            vcek=vcek_bytes,
            cert_chain=chain,
            now=when,
            trust=trust_anchors(trust_root, insecure_custom_root),
            amd_crl=read_bytes(amd_crl, "AMD CRL") if amd_crl else None,
        )
    except (AttestationError, FormatError) as e:
        raise NotGenuine(e) from e


def verify_gpu(
    *,
    file: str,
    cert_chain: str | None,
    at: str | None,
    trust_root: tuple[str, ...],
    insecure_custom_root: bool,
    nonce: str | None,
    ocsp: tuple[str, ...],
    rim: tuple[str, ...],
    **_cpu_only: object,
) -> list[GpuClaims]:
    """Verify NVIDIA GPU evidence: FILE is NVIDIA's serialized evidence JSON (one entry per
    GPU, chain included) or a report as hex text (or bytes) with ``--cert-chain``."""
    from shieldml.attest import load_evidence_json, load_gpu_chain, verify_gpu_evidence

    data = read_bytes(file, "evidence")
    if data.lstrip().startswith((b"[", b"{")):
        items = [(e.report, e.chain_pem) for e in load_evidence_json(data)]
    else:
        if not cert_chain:
            raise ShieldError(
                "a GPU report needs its certificate chain", hint="pass --cert-chain (PEM)"
            )
        try:  # NVIDIA's tools write reports as hex text; anything else is taken as bytes
            raw = bytes.fromhex(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raw = data
        items = [(raw, read_bytes(cert_chain, "certificate chain"))]
    expected = None
    if nonce is not None:
        try:
            expected = bytes.fromhex(nonce)
        except ValueError:
            raise ShieldError(f"--nonce {nonce!r} is not hex") from None
        if len(expected) != 32:
            raise ShieldError(f"--nonce must be 32 bytes (64 hex digits), not {len(expected)}")
    when = parse_time(at)
    trust = trust_anchors(trust_root, insecure_custom_root)
    ocsp_der = [read_bytes(o, "OCSP response") for o in ocsp]
    rims = [read_bytes(r, "RIM") for r in rim]
    out = []
    for report, chain_pem in items:
        try:
            out.append(
                verify_gpu_evidence(
                    report,
                    load_gpu_chain(chain_pem),
                    now=when,
                    trust=trust,
                    nonce=expected,
                    ocsp_responses=ocsp_der if ocsp else None,
                    rims=rims,
                )
            )
        except (AttestationError, FormatError) as e:
            raise NotGenuine(e) from e
    return out
