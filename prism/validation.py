"""msgspec's validation errors as the one-line ``field: reason`` an operator reads.

Shared by the server config (``prism.config``) and the backends' option
structs (``prism.backends.options``), so that both phrase a mistake the same
way: ``Expected `int`, got `str` - at `$.a[0].b``` becomes ``("a[0].b",
"expected int, got str")``. No other imports: config loading must stay light.
"""

from __future__ import annotations

import re

_MSGSPEC_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(?P<name>[^`]*)`$")
_MISSING_FIELD = re.compile(r"^Object missing required field `(?P<name>[^`]*)`$")


def rephrase(message: str) -> tuple[str, str]:
    """``(path, reason)`` for a msgspec ValidationError's text; path "" for the whole value."""
    match = _MSGSPEC_PATH.match(message)
    if match is None:  # cannot happen: the pattern matches any string
        return "", one_line(message)
    text, path = match["msg"], (match["path"] or "").lstrip(".")
    if unknown := _UNKNOWN_FIELD.match(text):
        return join(path, unknown["name"]), "unknown field"
    if missing := _MISSING_FIELD.match(text):
        return join(path, missing["name"]), "required field missing"
    reason = one_line(text.replace("`", ""))
    return path, reason[:1].lower() + reason[1:]


def join(path: str, name: str) -> str:
    """``path.name``, or ``name`` alone at the top."""
    return f"{path}.{name}" if path else name


def one_line(text: str) -> str:
    return " ".join(text.split())
