"""Moving a namespace to another backend in the config file (``prism migrate finish``).

A finished migration leaves the namespace on its target; the config file
must say so, or the next start would open the source again. The file is
edited with ``tomlkit``, which keeps what it does not touch as it was:
comments, blank lines, key order, quoting and the layout of tables. Only
the namespace's ``backend`` value and its ``options`` change: options
written as an inline table (``options = {...}``) stay one, options written
as a ``[...options]`` table keep their header (their keys are replaced),
and a namespace without options gets an inline table after ``backend``.
The caller replaces the file atomically
(``prism.config.store.replace_file``) and checks the result with Prism's own
loader before it does.
"""

from __future__ import annotations

from typing import Any

import tomlkit
import tomlkit.exceptions
from tomlkit.items import AoT, InlineTable, Table

__all__ = ["RewriteError", "find_namespace", "retarget"]


class RewriteError(Exception):
    """The file cannot be rewritten so (one line)."""


def _namespace_tables(doc: Any) -> list[Any]:
    def tables(value: Any) -> list[Any]:
        if isinstance(value, AoT | list):
            return [t for t in value if isinstance(t, Table | InlineTable | dict)]
        return []

    out = tables(doc.get("namespaces", []))
    for tenant in tables(doc.get("tenants", [])):
        out += tables(tenant.get("namespaces", []))
    return out


def find_namespace(doc: Any, namespace: str) -> Any:
    """The table of ``namespace`` in the parsed config ``doc``; RewriteError if it has none."""
    for table in _namespace_tables(doc):
        if table.get("name") == namespace:
            return table
    raise RewriteError(f"the config file has no namespace {namespace!r} (given by flags or environment?)")


def _inline(options: dict[str, Any]) -> InlineTable:
    table = tomlkit.inline_table()
    for key, value in options.items():
        table[key] = _plain(value)
    return table


def _plain(value: Any) -> Any:
    """A value as tomlkit writes it: nested tables inline (an inline table holds no header)."""
    if isinstance(value, dict):
        return _inline(value)
    if isinstance(value, list | tuple):
        array = tomlkit.array()
        array.extend(_plain(v) for v in value)
        return array
    return value


def retarget(text: bytes, namespace: str, backend: str, options: dict[str, Any]) -> bytes:
    """The config file ``text`` with ``namespace`` on ``backend`` with ``options``."""
    try:
        doc = tomlkit.parse(text.decode("utf-8"))
    except (UnicodeDecodeError, tomlkit.exceptions.TOMLKitError) as exc:
        raise RewriteError(f"the config file does not parse: {exc}") from None
    table = find_namespace(doc, namespace)
    table["backend"] = backend
    old = table.get("options")
    try:
        if isinstance(old, Table) and not isinstance(old, InlineTable):
            for key in list(old.keys()):
                del old[key]
            for key, value in options.items():
                old[key] = _plain(value)
        else:
            table["options"] = _inline(dict(options))
        return tomlkit.dumps(doc).encode()
    except (TypeError, ValueError, tomlkit.exceptions.TOMLKitError) as exc:
        raise RewriteError(f"cannot write the options as TOML: {exc}") from None
