"""Moving a namespace to another backend in the config file (``prism migrate finish``).

A finished migration leaves the namespace on its target; the config file
must say so, or the next start would open the source again. The file is
parsed (``tomllib``), the namespace's ``backend`` and ``options`` replaced,
and the whole document written back as TOML: Python's standard library
reads TOML but does not edit it, so comments and the file's layout are not
kept (the keys, tables and values are). The caller replaces the file
atomically (``prism.config.store.replace_file``) and checks the result with
Prism's own loader before it does.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import tomllib
from typing import Any

__all__ = ["RewriteError", "find_namespace", "retarget", "to_toml"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class RewriteError(Exception):
    """The file cannot be rewritten so (one line)."""


def _namespace_tables(doc: dict[str, Any]) -> list[dict[str, Any]]:
    tables = [t for t in doc.get("namespaces", []) if isinstance(t, dict)]
    for tenant in doc.get("tenants", []):
        if isinstance(tenant, dict):
            tables += [t for t in tenant.get("namespaces", []) if isinstance(t, dict)]
    return tables


def find_namespace(doc: dict[str, Any], namespace: str) -> dict[str, Any]:
    """The table of ``namespace`` in the parsed config ``doc``; RewriteError if it has none."""
    for table in _namespace_tables(doc):
        if table.get("name") == namespace:
            return table
    raise RewriteError(f"the config file has no namespace {namespace!r} (given by flags or environment?)")


def retarget(text: bytes, namespace: str, backend: str, options: dict[str, Any]) -> bytes:
    """The config file ``text`` with ``namespace`` on ``backend`` with ``options``."""
    try:
        doc = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RewriteError(f"the config file does not parse: {exc}") from None
    table = find_namespace(doc, namespace)
    table["backend"] = backend
    table["options"] = dict(options)
    return to_toml(doc).encode()


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise RewriteError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _table(lines: list[str], path: list[str], table: dict[str, Any]) -> None:
    for key, value in table.items():
        if not isinstance(value, dict) and not _is_table_array(value):
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in table.items():
        dotted = ".".join(_key(k) for k in [*path, key])
        if isinstance(value, dict):
            lines += ["", f"[{dotted}]"]
            _table(lines, [*path, key], value)
        elif _is_table_array(value):
            for item in value:
                lines += ["", f"[[{dotted}]]"]
                _table(lines, [*path, key], item)


def to_toml(doc: dict[str, Any]) -> str:
    """``doc`` (as ``tomllib`` returns it) as a TOML document that parses back to it."""
    lines: list[str] = []
    _table(lines, [], doc)
    return "\n".join(lines).lstrip("\n") + "\n"
