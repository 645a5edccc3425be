"""shieldml: confidential machine learning on untrusted clouds.

Models and data stay encrypted everywhere outside a hardware TEE; see ``docs/`` and
``shieldml --help``. Subpackages: :mod:`shieldml.files` (protected files), :mod:`shieldml.errors`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("shieldml")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
