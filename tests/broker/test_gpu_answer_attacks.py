"""Red team of what came after 7cb2afe on the broker's and the broker client's side:

* ``verify_session_gpus`` refuses one GPU at two places ('gpu distinct': same ueid, same leaf
  key, same BROM key) -- the host re-encodes certificates, reorders or pads chains; genuine GPUs
  of one family (one ICA, identity CA and root) are not flagged;
* the client's check of the release answer's ``gpus`` (``_verified_gpus``): a malicious broker
  names other GPUs or smuggles text;
* GPU refusals mapped to :class:`NotGenuineError` (``_error``) and shown by the CLI
  (``print_error``): what a malicious broker's refusal can make the CLI print.

An attack that succeeds is marked ``xfail(strict=True)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import load_der_x509_certificate

from shieldml.attest import _der
from shieldml.broker import protocol
from shieldml.broker.client import MAX_GPU_FIELD, _error, _verified_gpus
from shieldml.broker.server.release import decide
from shieldml.cli._output import begin, print_error
from shieldml.errors import BrokerError, NotGenuineError
from shieldml.testing.simulated_gpu import (
    FWID_OID,
    SimulatedGpu,
    _Ca,
    _issue,
    _key,
)
from tests.broker.test_release_gpu import MEASUREMENT, WD, bundle, session

P384_N = int(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973",
    16,
)


def policy(n: int) -> str:
    return "\n".join(
        [
            "[[profile]]", 'tee = "snp"', f'measurement = ["{MEASUREMENT.hex()}"]',
            'host_data = "any"', 'min_reported_tcb = "any"', 'vmpl = "any"',
            f'workload_digest = ["{WD}"]', "insecure_allow_out_of_date = true",
            "insecure_allow_simulated = true", "[profile.gpu]", f"count = {n}",
            'driver_version = ["550.90.07"]', 'vbios_version = "any"',
        ]
    ) + "\n"  # fmt: skip


def _tlv(data: bytes, at: int) -> tuple[int, int]:
    """(start of content, end) of the DER element at ``at``."""
    n = data[at + 1]
    if n < 0x80:
        return at + 2, at + 2 + n
    k = n & 0x7F
    length = int.from_bytes(data[at + 2 : at + 2 + k], "big")
    return at + 2 + k, at + 2 + k + length


def malleated(g: SimulatedGpu) -> SimulatedGpu:
    """The same GPU whose leaf certificate carries the other valid ECDSA signature (s -> n - s):
    other bytes, same serial, same key, still signed by its BROM."""
    der = g.chain[0].cert.public_bytes(Encoding.DER)
    body, _end = _tlv(der, 0)
    _tbs_start, tbs_end = _tlv(der, body)
    _alg_start, alg_end = _tlv(der, tbs_end)
    sig_start, sig_end = _tlv(der, alg_end)
    r, s = decode_dss_signature(der[sig_start + 1 : sig_end])
    sig = encode_dss_signature(r, P384_N - s)
    new = _der.encode_seq(der[body:tbs_end], der[tbs_end:alg_end], _der.encode(3, b"\0" + sig))
    cert = load_der_x509_certificate(new)
    assert cert.serial_number == g.chain[0].cert.serial_number and new != der
    return replace(g, chain=[_Ca(g.chain[0].key, cert), *g.chain[1:]])


def second_leaf(g: SimulatedGpu) -> SimulatedGpu:
    """Another FMC leaf (new key, new serial) issued by ``g``'s own BROM: the same device."""
    tcb = _der.encode_seq(
        _der.encode_int(1),
        _der.encode_seq(_der.encode_oid("2.16.840.1.101.3.4.2.2"), _der.encode(4, g.fwid)),
    )
    from cryptography import x509

    ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(FWID_OID), tcb)
    leaf = _issue(
        "GH100 A01 GSP FMC LF", _key(), g.chain[1], g.now, ca=False, days=3650, extensions=(ext,)
    )
    return replace(g, chain=[leaf, *g.chain[1:]])


def refused(gpu_broker: Any, gpus: Callable[[bytes], list[Any]], n: int) -> NotGenuineError:
    b, settings, sim = gpu_broker
    b.store.set_policy("model", policy(n))
    rd, req = session(b, sim)
    with pytest.raises(NotGenuineError) as e:
        decide(b.store, settings, replace(req, gpus=gpus(rd)))
    return e.value


# -- 'gpu distinct' -------------------------------------------------------------------------


def test_malleated_leaf_signature_verifies_alone(gpu_broker, family):
    """The control: the re-encoded leaf is a certificate the broker accepts on its own."""
    b, settings, sim = gpu_broker
    b.store.set_policy("model", policy(1))
    rd, req = session(b, sim)
    released = decide(
        b.store, settings, replace(req, gpus=[bundle(malleated(family[0]), rd, 0, 1)])
    )
    assert [g.ueid for g in released.gpus] == [str(family[0].chain[0].cert.serial_number)]


def test_same_gpu_with_a_reencoded_leaf_certificate_is_still_one_gpu(gpu_broker, family):
    e = refused(
        gpu_broker,
        lambda rd: [bundle(family[0], rd, 0, 2), bundle(malleated(family[0]), rd, 1, 2)],
        2,
    )
    assert e.check == "gpu distinct" and "GPU 1 is GPU 0 again" in e.message


def test_second_leaf_under_the_same_brom_is_one_gpu(gpu_broker, family):
    """Another leaf key and serial, the same device (BROM) key: not a second GPU."""
    other = second_leaf(family[1])
    assert other.chain[0].cert.serial_number != family[1].chain[0].cert.serial_number
    e = refused(gpu_broker, lambda rd: [bundle(family[1], rd, 0, 2), bundle(other, rd, 1, 2)], 2)
    assert e.check == "gpu distinct" and "GPU 1 is GPU 0 again" in e.message


def test_second_leaf_under_the_same_brom_verifies_alone(gpu_broker, family):
    """The control of the test above: that leaf is genuine on its own."""
    b, settings, sim = gpu_broker
    b.store.set_policy("model", policy(1))
    rd, req = session(b, sim)
    released = decide(
        b.store, settings, replace(req, gpus=[bundle(second_leaf(family[1]), rd, 0, 1)])
    )
    assert len(released.gpus) == 1


def test_sixteen_gpus_sharing_one_ica_identity_and_root_are_not_flagged(gpu_broker, family):
    b, settings, sim = gpu_broker
    assert len(family) == protocol.MAX_GPUS
    assert len({g.chain[2].cert.fingerprint(_sha256()) for g in family}) == 1  # one shared ICA
    b.store.set_policy("model", policy(16))
    rd, req = session(b, sim)
    released = decide(
        b.store, settings, replace(req, gpus=[bundle(g, rd, i, 16) for i, g in enumerate(family)])
    )
    assert "model" in released.keys
    assert len({g.ueid for g in released.gpus}) == 16


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def _pem(certs: list[Any]) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def test_chain_with_leaf_and_brom_swapped_is_refused(gpu_broker, family):
    g = family[2]
    swapped = [g.chain[1].cert, g.chain[0].cert, *(c.cert for c in g.chain[2:])]
    e = refused(
        gpu_broker,
        lambda rd: [
            bundle(family[3], rd, 0, 2),
            replace(bundle(g, rd, 1, 2), chain_pem=_pem(swapped)),
        ],
        2,
    )
    assert e.check in {"certificate chain", "report signature", "FWID"}, e.check


def test_chain_padded_with_an_extra_certificate_is_refused(gpu_broker, family):
    g = family[4]
    padded = [*(c.cert for c in g.chain), family[5].chain[1].cert]
    e = refused(
        gpu_broker,
        lambda rd: [
            bundle(family[4], rd, 0, 2),
            replace(bundle(g, rd, 1, 2), chain_pem=_pem(padded)),
        ],
        2,
    )
    assert e.check == "certificate chain"


# -- the client's check of the answer's gpus --------------------------------------------------


def summary(g: SimulatedGpu, **changes: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "arch": "hopper", "ueid": str(g.chain[0].cert.serial_number),
        "hwmodel": "GH100 A01 GSP BROM", "driver_version": "550.90.07",
        "vbios_version": "96.00.9F.00.01", "rim_ids": ["NV_GPU_DRIVER_GH100_550.90.07"],
        "rim_kinds": ["driver"], "measurements_matched": True,
        "cc_mode": "on", "root": "simulated",
    }  # fmt: skip
    d.update(changes)
    return d


def sent(g: SimulatedGpu) -> dict[str, Any]:
    return {"cc_mode": "on", "evidence": "", "certificate": g.chain_pem().decode()}


def answer(listed: Any, gpus: list[SimulatedGpu], proof: Any = None) -> tuple[dict[str, Any], ...]:
    return _verified_gpus("https://broker", listed, [sent(g) for g in gpus], proof)


def test_client_accepts_the_answer_a_genuine_broker_gives(family):
    got = answer([summary(family[0]), summary(family[1])], family[:2])
    assert [g["ueid"] for g in got] == [str(g.chain[0].cert.serial_number) for g in family[:2]]


@pytest.mark.parametrize(
    "value",
    [
        "\uff15\uff15\uff10.90.07",  # full-width digits: int() reads them, the receipt's min check would too
        "550.90.07\u200b",  # zero-width space
        "hopper\u0430",  # Cyrillic a
        "550.90.07\x00",
        "\x1b[32mon\x1b[0m",
        "on\n  ✓ gpu cc_mode: on",
        "on\r",
        "x" * (MAX_GPU_FIELD + 1),
    ],
)
def test_client_refuses_unicode_control_and_long_text_in_a_gpu_field(family, value: str):
    with pytest.raises(BrokerError, match="malformed field for GPU 1"):
        answer([summary(family[0]), summary(family[1], driver_version=value)], family[:2])


def test_client_accepts_a_field_of_exactly_the_bound(family):
    got = answer([summary(family[0], hwmodel="x" * MAX_GPU_FIELD)], family[:1])
    assert len(got[0]["hwmodel"]) == MAX_GPU_FIELD


@pytest.mark.parametrize("value", [True, 550, 5.5, ["on"], {"v": "on"}])
def test_client_refuses_non_string_values(family, value: Any):
    with pytest.raises(BrokerError, match="malformed field for GPU 0"):
        answer([summary(family[0], cc_mode=value)], family[:1])


@pytest.mark.parametrize("ids", [["a"] * 9, [1], [None], "NV_GPU_DRIVER", None, ["\x1b[2J"], ["é"]])
def test_client_refuses_malformed_rim_ids(family, ids: Any):
    with pytest.raises(BrokerError, match="malformed RIM ids for GPU 0"):
        answer([summary(family[0], rim_ids=ids)], family[:1])


@pytest.mark.parametrize(
    ("ueid", "match"),
    [
        (None, "names another GPU 0"),
        (0, "malformed field for GPU 0"),
        ("0", "names another GPU 0"),
        ("", "names another GPU 0"),
        ("x", "names another GPU 0"),
    ],
)
def test_client_refuses_a_ueid_that_is_not_the_sent_leafs_serial(family, ueid: Any, match: str):
    with pytest.raises(BrokerError, match=match):
        answer([summary(family[0], ueid=ueid)], family[:1])


def test_client_refuses_the_serial_of_a_later_certificate_of_the_sent_chain(family):
    brom = str(family[0].chain[1].cert.serial_number)
    with pytest.raises(BrokerError, match="names another GPU 0"):
        answer([summary(family[0], ueid=brom)], family[:1])


def test_client_refuses_an_integer_ueid_equal_to_the_serial(family):
    serial = family[0].chain[0].cert.serial_number
    with pytest.raises(BrokerError, match="malformed field for GPU 0"):
        answer([summary(family[0], ueid=serial)], family[:1])


def test_client_refuses_gpus_in_another_order(family):
    with pytest.raises(BrokerError, match="names another GPU 0"):
        answer([summary(family[1]), summary(family[0])], family[:2])


def test_client_refuses_a_record_with_a_field_dropped_or_added(family):
    short = summary(family[0])
    del short["root"]
    with pytest.raises(BrokerError, match="other fields than a GPU summary"):
        answer([short], family[:1])
    with pytest.raises(BrokerError, match="other fields than a GPU summary"):
        answer([summary(family[0], note="ok")], family[:1])


def test_client_refuses_an_answer_that_differs_from_its_audit_record(family):
    proof = SimpleNamespace(data={"gpus": [summary(family[0], driver_version="535.104.05")]})
    with pytest.raises(BrokerError, match="differs from the GPUs in the release's audit record"):
        answer([summary(family[0])], family[:1], proof)


def test_client_refuses_gpus_where_the_audit_record_lists_none(family):
    proof = SimpleNamespace(data={})
    with pytest.raises(BrokerError, match="differs from the GPUs in the release's audit record"):
        answer([summary(family[0])], family[:1], proof)


def test_client_without_an_audit_proof_still_checks_the_list(family):
    with pytest.raises(BrokerError, match="does not name the 1 GPU"):
        answer([], family[:1], None)
    with pytest.raises(BrokerError, match="names another GPU 0"):
        answer([summary(family[1])], family[:1], None)


def test_client_refuses_when_the_sent_certificate_is_not_a_pem(family):
    bad = [{"cc_mode": "on", "certificate": "-----BEGIN CERTIFICATE-----\nAA==\n"}]
    with pytest.raises(BrokerError, match="names another GPU 0"):
        _verified_gpus("https://broker", [summary(family[0])], bad, None)


def test_client_and_broker_read_the_same_first_certificate_of_a_padded_pem(family):
    """A PEM with text and a non-certificate block before the chain: the client's leaf (the
    first certificate) is the broker's chain[0]."""
    from shieldml.attest import load_gpu_chain

    pem = (
        b"junk\n-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
        + family[0].chain_pem()
    )
    chain = load_gpu_chain(pem)
    assert chain[0].serial_number == family[0].chain[0].cert.serial_number and len(chain) == 5
    item = {"cc_mode": "on", "certificate": pem.decode()}
    got = _verified_gpus("https://broker", [summary(family[0])], [item], None)
    assert got[0]["ueid"] == str(chain[0].serial_number)
    with pytest.raises(BrokerError, match="names another GPU 0"):
        brom = str(chain[1].serial_number)
        _verified_gpus("https://broker", [summary(family[0], ueid=brom)], [item], None)


# -- a malicious broker's GPU refusal, as the CLI shows it -------------------------------------


def gpu_refusal(**fields: Any) -> dict[str, Any]:
    return {"reason": protocol.GPU_NOT_GENUINE, "reasons": ["GPU evidence: x"], **fields}


def test_gpu_refusal_maps_to_not_genuine_only_for_the_exact_reason_and_403():
    assert isinstance(_error(403, gpu_refusal(), "/v1/release"), NotGenuineError)
    other = {"reason": protocol.GPU_NOT_GENUINE + " "}
    assert not isinstance(_error(403, other, "/v1/release"), NotGenuineError)
    assert not isinstance(_error(400, gpu_refusal(), "/v1/release"), NotGenuineError)


@pytest.mark.parametrize(
    "detail",
    [
        gpu_refusal(check=["gpu cc_mode"], message=5, expected={"a": 1}, checks="all"),
        gpu_refusal(checks=[1, None, {"name": {"x": 1}, "passed": "yes", "detail": 3}]),
        gpu_refusal(reasons=[None, 3, {"a": 1}], audit_seq="7"),
        {"reason": protocol.GPU_NOT_GENUINE, "reasons": "not a list"},
        gpu_refusal(message="[bold red]ok[/bold red] [link=https://x]y[/link]"),
    ],
)
def test_malformed_gpu_refusal_renders_without_crashing(
    detail: dict[str, Any], capsys: pytest.CaptureFixture[str]
):
    e = _error(403, detail, "/v1/release")
    assert isinstance(e, NotGenuineError)
    begin()
    print_error("error", e, 1)
    text = capsys.readouterr().err
    assert text.startswith("error: the broker found the evidence not genuine")
    if "[bold red]ok" in str(detail):
        assert "[bold red]ok[/bold red]" in text  # markup shown as text, not applied


def test_malicious_gpu_refusal_cannot_forge_lines_or_terminal_escapes(
    capsys: pytest.CaptureFixture[str],
):
    detail = gpu_refusal(
        check="gpu cc_mode",
        message="GPU 0 checked\n  ✓ gpu cc_mode: on\x1b[2K\x1b[32m",
        expected="on\nreleased: model",
        found="on",
        checks=[{"name": "nonce", "passed": True, "detail": "ok\x1b]0;title\x07"}],
        audit_seq=3,
    )
    begin()
    print_error("error", _error(403, detail, "/v1/release"), 1)
    text = capsys.readouterr().err
    assert "\x1b" not in text, repr(text)
    assert "\nreleased: model" not in text and "\n  ✓ gpu cc_mode: on" not in text, text
