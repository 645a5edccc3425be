"""The transparency-log pieces against their definitions: RFC 9162 trees and proofs, C2SP notes.

Known answers come from a reference written here straight from RFC 9162 section 2.1 (naive
recursion over slices), from the RFC 6962 example leaves whose roots the Certificate Transparency
project publishes, and from the signed-note example of the Go ``note`` package.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from shieldml.broker import tlog
from shieldml.errors import AuditChainError, FormatError


# -- a reference straight from RFC 9162 section 2.1 --------------------------------------------
def ref_mth(data: list[bytes]) -> bytes:
    n = len(data)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + data[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + ref_mth(data[:k]) + ref_mth(data[k:])).digest()


def ref_path(m: int, data: list[bytes]) -> list[bytes]:
    n = len(data)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*ref_path(m, data[:k]), ref_mth(data[k:])]
    return [*ref_path(m - k, data[k:]), ref_mth(data[:k])]


def ref_subproof(m: int, data: list[bytes], b: bool) -> list[bytes]:
    n = len(data)
    if m == n:
        return [] if b else [ref_mth(data)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*ref_subproof(m, data[:k], b), ref_mth(data[k:])]
    return [*ref_subproof(m - k, data[k:], False), ref_mth(data[:k])]


def entries(n: int) -> list[bytes]:
    return [f"record {i}".encode() for i in range(n)]


def leaves(data: list[bytes]) -> list[bytes]:
    return [tlog.leaf_hash(d) for d in data]


# RFC 6962's example leaves and the roots of their prefixes (certificate-transparency test data)
CT_LEAVES = [b"", b"\x00", b"\x10", b"\x20\x21", b"\x30\x31", b"\x40\x41\x42\x43",
             bytes(range(0x50, 0x58)), bytes(range(0x60, 0x70))]  # fmt: skip
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_tree_hash_matches_the_published_rfc6962_roots_and_the_definition():
    assert tlog.tree_hash([]) == hashlib.sha256(b"").digest() == tlog.EMPTY_ROOT
    for n in range(1, 9):
        assert tlog.tree_hash(leaves(CT_LEAVES[:n])).hex() == CT_ROOTS[n - 1]
    for n in range(0, 70):
        assert tlog.tree_hash(leaves(entries(n))) == ref_mth(entries(n)), n


def test_proofs_match_the_definition_for_every_small_tree():
    for n in range(1, 40):
        data = entries(n)
        lh = leaves(data)
        for i in range(n):
            assert tlog.inclusion_proof(i, lh) == ref_path(i, data), (i, n)
        for m in range(1, n + 1):
            assert tlog.consistency_proof(m, lh) == ref_subproof(m, data, True), (m, n)


def test_frontier_appends_roots_and_proves_the_next_leaf():
    f = tlog.Frontier()
    data = entries(70)
    for n, d in enumerate(data):
        assert f.size == n and f.root() == ref_mth(data[:n])
        assert f.next_inclusion_proof() == ref_path(n, data[: n + 1])
        f = f.append(tlog.leaf_hash(d))
    with pytest.raises(FormatError):
        tlog.Frontier(3, (bytes(32),))  # size 3 needs two subtree roots


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))))
def test_every_inclusion_proof_verifies(case: tuple[int, int]):
    n, i = case
    lh = leaves(entries(n))
    root = tlog.tree_hash(lh)
    tlog.verify_inclusion(lh[i], i, n, tlog.inclusion_proof(i, lh), root)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 300).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_every_consistency_proof_between_sizes_m_le_n_verifies(case: tuple[int, int]):
    m, n = case
    lh = leaves(entries(n))
    proof = tlog.consistency_proof(m, lh)
    tlog.verify_consistency(m, n, tlog.tree_hash(lh[:m]), tlog.tree_hash(lh), proof)


def _tamper(proof: list[bytes], how: int, where: int) -> list[bytes]:
    p = list(proof)
    if how == 0 and p:  # flip a bit of one hash
        j = where % len(p)
        p[j] = bytes([p[j][0] ^ 1]) + p[j][1:]
    elif how == 1 and p:  # drop one
        del p[where % len(p)]
    elif how == 2:  # add one
        p.insert(where % (len(p) + 1), hashlib.sha256(b"extra").digest())
    elif len(p) >= 2:  # swap two
        p[0], p[-1] = p[-1], p[0]
    return p


@settings(max_examples=200, deadline=None)
@given(
    st.integers(2, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))),
    st.integers(0, 3),
    st.integers(0, 1000),
)
def test_a_tampered_inclusion_proof_fails(case: tuple[int, int], how: int, where: int):
    n, i = case
    lh = leaves(entries(n))
    root = tlog.tree_hash(lh)
    proof = tlog.inclusion_proof(i, lh)
    bad = _tamper(proof, how, where)
    if bad == proof:  # a swap of two equal ends, or nothing to swap: nothing tampered
        return
    with pytest.raises(AuditChainError):
        tlog.verify_inclusion(lh[i], i, n, bad, root)
    with pytest.raises(AuditChainError):  # the right proof for another leaf, index or root
        tlog.verify_inclusion(lh[(i + 1) % n], i, n, proof, root)
    with pytest.raises(AuditChainError):
        tlog.verify_inclusion(lh[i], i, n, proof, hashlib.sha256(root).digest())


@settings(max_examples=200, deadline=None)
@given(
    st.integers(2, 200).flatmap(lambda n: st.tuples(st.integers(1, n - 1), st.just(n))),
    st.integers(0, 3),
    st.integers(0, 1000),
)
def test_a_tampered_consistency_proof_fails(case: tuple[int, int], how: int, where: int):
    m, n = case
    lh = leaves(entries(n))
    old, new = tlog.tree_hash(lh[:m]), tlog.tree_hash(lh)
    proof = tlog.consistency_proof(m, lh)
    bad = _tamper(proof, how, where)
    if bad != proof:
        with pytest.raises(AuditChainError):
            tlog.verify_consistency(m, n, old, new, bad)
    rewritten = list(lh)
    rewritten[where % m] = tlog.leaf_hash(b"rewritten")  # a record the old tree covered
    with pytest.raises(AuditChainError):
        tlog.verify_consistency(m, n, old, tlog.tree_hash(rewritten), proof)
    with pytest.raises(AuditChainError):  # a rewound (smaller) tree is never consistent
        tlog.verify_consistency(n, m, new, old, proof)


# -- signed notes and checkpoints ---------------------------------------------------------------
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2"
    "pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)


def test_signed_note_matches_the_go_note_packages_example():
    signer = tlog.NoteSigner.parse(GO_SKEY)
    assert signer.verifier.vkey() == GO_VKEY
    assert signer.sign(GO_TEXT) == GO_NOTE  # Ed25519 is deterministic
    text, names = tlog.open_note(GO_NOTE, [tlog.NoteVerifier.parse(GO_VKEY)])
    assert (text, names) == (GO_TEXT, ["PeterNeumann"])


def test_checkpoint_note_built_from_the_c2sp_definitions():
    seed = bytes(range(32))
    name = "example.com/shieldml-log"
    pub = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    key_hash = hashlib.sha256(name.encode() + b"\n\x01" + pub).digest()[:4]
    root = hashlib.sha256(b"a root").digest()
    body = f"{name}\n42\n{base64.b64encode(root).decode()}\n"
    sig = Ed25519PrivateKey.from_private_bytes(seed).sign(body.encode())
    expected = body + "\n\u2014 " + name + " " + base64.b64encode(key_hash + sig).decode() + "\n"

    signer = tlog.NoteSigner(name, seed)
    assert signer.sign(tlog.Checkpoint(name, 42, root).body()) == expected
    vkey_key = base64.b64encode(b"\x01" + pub).decode()
    assert signer.verifier.vkey() == f"{name}+{key_hash.hex()}+{vkey_key}"
    cp = tlog.open_checkpoint(expected, [tlog.NoteVerifier.parse(signer.verifier.vkey())])
    assert (cp.origin, cp.size, cp.root) == (name, 42, root)


def test_forged_checkpoint_signed_by_another_key_is_refused():
    real = tlog.NoteSigner("shieldml-broker-test", bytes(32))
    forger = tlog.NoteSigner("shieldml-broker-test", bytes([1]) * 32)  # same name, other key
    note = forger.sign(tlog.Checkpoint(real.name, 7, bytes(32)).body())
    with pytest.raises(AuditChainError, match="forged"):
        tlog.open_checkpoint(note, [real.verifier])
    # the right key over edited text: the signature no longer verifies
    good = real.sign(tlog.Checkpoint(real.name, 7, bytes(32)).body())
    with pytest.raises(AuditChainError):
        tlog.open_checkpoint(good.replace("\n7\n", "\n8\n"), [real.verifier])
    assert tlog.open_checkpoint(good, [forger.verifier, real.verifier]).size == 7


@pytest.mark.parametrize(
    "body",
    ["origin\n01\n" + "A" * 43 + "=\n", "origin\n1\nnot base64\n", "\n1\n" + "A" * 43 + "=\n",
     "origin\n1\n" + base64.b64encode(bytes(31)).decode() + "\n", "origin\n-1\n" + "A" * 43 + "=\n",
     "origin\n1\n" + "A" * 43 + "="],
)  # fmt: skip
def test_malformed_checkpoints_are_refused(body: str):
    with pytest.raises(FormatError):
        tlog.Checkpoint.parse(body)


def test_signing_key_file_is_created_once_with_mode_0600(tmp_path):
    path = tmp_path / "log-signing-key"
    a = tlog.NoteSigner.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    b = tlog.NoteSigner.load_or_create(path)
    assert a.verifier.vkey() == b.verifier.vkey()
    assert [p.name for p in tmp_path.iterdir()] == ["log-signing-key"]
