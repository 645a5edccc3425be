"""shieldml: confidential machine learning on untrusted clouds.

Models and data stay encrypted everywhere outside a hardware TEE; see ``docs/`` and
``shieldml --help``. Subpackages: :mod:`shieldml.files` (protected files), :mod:`shieldml.errors`.

``__version__`` is looked up on first use: ``importlib.metadata`` costs a tenth of a second, which
every ``shieldml run`` and its decrypted view would otherwise pay at start.
"""

from __future__ import annotations

from typing import Any

__all__ = ["__version__"]


def __getattr__(name: str) -> Any:
    if name != "__version__":
        raise AttributeError(f"module 'shieldml' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("shieldml")
    except PackageNotFoundError:  # running from a source tree without installation
        found = "0.0.0"
    globals()["__version__"] = found
    return found
