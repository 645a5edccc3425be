"""A small TOML emitter for the Gramine manifest template: values, never string formatting.

Gramine reads the template in two passes: ``gramine-manifest`` renders it with Jinja2, then parses
the result as TOML. A string from a job (a path, a URL, an argument) must survive both as data:

- TOML: every string is a basic string written by :func:`shieldml.runner.manifest.toml_string`
  (the same escaper ``shieldml job init`` writes ``job.toml`` with): ``"``, ``\\`` and every
  control character escaped, so no value can end its string, start a new line, or add a key.
  Keys that are not bare (``A-Za-z0-9_-``) are quoted the same way. A lone surrogate cannot be
  written at all and is refused.
- Jinja: ``{`` and ``}`` in a string are escaped too (``\\u007B``, ``\\u007D``), so no value can
  open a ``{{ … }}``, ``{% … %}`` or ``{# … #}`` that the renderer would run. Only
  :class:`Template` strings (the generator's own constants) keep their braces.

Value types: ``str``, ``bool``, ``int``, lists, and mappings. A mapping at the top or under another
top-level mapping becomes dotted keys (``loader.env.LANG = …``); an :class:`Inline` mapping, or
one inside a list, becomes an inline table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from shieldml.runner.manifest import toml_string

Value = str | bool | int | Sequence["Value"] | Mapping[str, "Value"]
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)


class Template(str):
    """A string the generator wrote itself, whose ``{{ … }}`` placeholders Jinja is to fill."""

    __slots__ = ()


class Inline(dict[str, Value]):
    """A mapping written as one inline table (``{ path = "…", uri = "…" }``)."""


def string(s: str) -> str:
    """``s`` as a TOML basic string (and, unless a :class:`Template`, inert under Jinja).

    Escaping the braces after :func:`toml_string` is exact: it never writes a brace itself, and a
    ``\\u007B`` in a basic string reads back as ``{``.
    """
    text = toml_string(s)
    if isinstance(s, Template):
        return text
    return text.replace("{", "\\u007B").replace("}", "\\u007D")


def key(k: str) -> str:
    if not isinstance(k, str):
        raise TypeError(f"TOML keys are strings, not {type(k).__name__}")
    return k if _BARE_KEY.fullmatch(k) else string(k)


def value(v: Value, indent: str = "") -> str:
    """One TOML value (inline: arrays of inline tables one item a line)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return string(v)
    if isinstance(v, Mapping):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{key(k)} = {value(x, indent)}" for k, x in v.items()) + " }"
    if isinstance(v, Sequence):
        items = [value(x, indent + "  ") for x in v]
        if not any(isinstance(x, Mapping | Sequence) and not isinstance(x, str) for x in v):
            one_line = "[" + ", ".join(items) + "]"
            if len(one_line) <= 100:
                return one_line
        inner = "".join(f"{indent}  {item},\n" for item in items)
        return "[\n" + inner + indent + "]"
    raise TypeError(f"no TOML for a {type(v).__name__}")


def dumps(doc: Mapping[str, Value], *, header: str = "") -> str:
    """The document: one ``dotted.key = value`` line per leaf, a blank line between top-level
    keys; ``header`` lines become ``#`` comments (they must not hold a newline themselves)."""
    lines = [f"# {line}" for line in header.splitlines()]
    for name, v in doc.items():
        if lines:
            lines.append("")
        _emit(lines, key(name), v)
    return "\n".join(lines) + "\n"


def _emit(lines: list[str], path: str, v: Value) -> None:
    if isinstance(v, Mapping) and not isinstance(v, Inline) and v:
        for k, x in v.items():
            _emit(lines, f"{path}.{key(k)}", x)
    else:
        lines.append(f"{path} = {value(v)}")
