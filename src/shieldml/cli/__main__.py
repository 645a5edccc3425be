"""``python -m shieldml.cli``: the ``shieldml`` command."""

from shieldml.cli import entry

entry()
