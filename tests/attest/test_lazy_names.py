"""``shieldml.attest`` loads each public name from its module on first use (PEP 562)."""

from __future__ import annotations

import importlib

import pytest

import shieldml.attest as attest


def test_every_public_name_is_the_object_its_module_defines():
    for name in attest.__all__:
        module, there = attest._WHERE[name]
        assert getattr(attest, name) is getattr(
            importlib.import_module(f"shieldml.attest.{module}"), there
        ), name
    assert sorted(dir(attest)) == sorted(attest.__all__)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'verify_everything'"):
        attest.verify_everything  # noqa: B018
    with pytest.raises(ImportError):
        from shieldml.attest import verify_everything  # noqa: F401
