"""Loading the config: four layers merged as plain data, decoded once.

Values come from four layers, highest first: command-line flags, ``PRISM_*``
environment variables, a TOML file, and the defaults of the structs. Layers
are merged as plain data before decoding, so a ``ServerConfig`` is built (and
validated) exactly once. Every failure is a ``ConfigError`` whose text is one
line that starts with the field it is about and says where the value came
from (``max_message_bytes: 10 out of range (1024-2147483647) (from
PRISM_MAX_MESSAGE_BYTES)``), because an operator reading a failed start-up
wants to know which line to fix.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from prism.config.fields import FieldError
from prism.config.server import ServerConfig
from prism.errors import ConfigError
from prism.validation import one_line, rephrase

DEFAULT_CONFIG_FILE = "prism.toml"


class ConfigSyntaxError(ConfigError):
    """The file is not a TOML document at all (as opposed to one whose values are refused)."""


CONFIG_PATH_ENV = "PRISM_CONFIG"


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f'expected an integer, got "{text}"') from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f'expected a number, got "{text}"') from None


# Environment variable -> (field, parser). Parsing happens here rather than in
# msgspec so that a bad value is reported under the variable's name.
ENV_VARS: Mapping[str, tuple[str, Callable[[str], Any]]] = {
    "PRISM_LISTEN": ("listen", str),
    "PRISM_DATA_DIR": ("data_dir", str),
    "PRISM_MAX_MESSAGE_BYTES": ("max_message_bytes", _parse_int),
    "PRISM_MAX_CONCURRENT_STREAMS": ("max_concurrent_streams", _parse_int),
    "PRISM_LOG_LEVEL": ("log_level", str),
    "PRISM_GRACEFUL_TIMEOUT_S": ("graceful_timeout_s", _parse_float),
    "PRISM_ADMIN_LISTEN": ("admin_listen", str),
    "PRISM_WORKERS": ("workers", _parse_int),
}


def load_config(
    path: str | None,
    env: Mapping[str, str],
    overrides: Mapping[str, Any],
) -> ServerConfig:
    """Build the server config from flags > ``PRISM_*`` env > TOML file > defaults.

    ``path`` is the file the user named (``--config``); without it the file is
    ``$PRISM_CONFIG``, else ``./prism.toml`` when it exists, else none.
    ``overrides`` maps field names to flag values; ``None`` means "flag not
    given". Empty environment variables count as unset, as shells and
    container specs often leave them empty rather than absent.
    """
    file_path = config_path(path, env)
    table = _read_toml(file_path) if file_path is not None else {}
    return _build(table, file_path, env, overrides)


def load_config_text(
    data: bytes, source: str, env: Mapping[str, str], overrides: Mapping[str, Any]
) -> ServerConfig:
    """``load_config`` with the TOML layer given as ``data`` (not yet written
    anywhere); errors name ``source`` as the file they come from.

    ``POST /v1/config`` checks a config this way before it writes the file.
    """
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigSyntaxError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigSyntaxError(f"{source}: invalid TOML: {one_line(str(exc))}") from None
    return _build(table, source, env, overrides)


def _build(
    table: Mapping[str, Any], file_path: str | None, env: Mapping[str, str], overrides: Mapping[str, Any]
) -> ServerConfig:
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for field, value in table.items():
        values[field] = value
        sources[field] = file_path or "the config file"
    for name, (field, value) in _env_values(env).items():
        values[field] = value
        sources[field] = name
    for field, value in overrides.items():
        if value is None:
            continue
        if field not in ServerConfig.__struct_fields__:
            raise ConfigError(f"{field}: unknown setting")
        values[field] = value
        sources[field] = "--" + field.replace("_", "-")
    if values.get("namespaces") == [] and not values.get("tenants"):
        raise ConfigError(
            _with_source("namespaces: at least one namespace is required", "namespaces", sources)
        )
    return _decode(values, sources)


def config_path(path: str | None, env: Mapping[str, str]) -> str | None:
    """The config file ``load_config`` reads: ``path``, else ``$PRISM_CONFIG``,
    else ``./prism.toml`` when it exists, else None."""
    if path:
        return path
    from_env = env.get(CONFIG_PATH_ENV)
    if from_env:
        return from_env
    return DEFAULT_CONFIG_FILE if os.path.isfile(DEFAULT_CONFIG_FILE) else None


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigSyntaxError(f"{path}: invalid TOML: {one_line(str(exc))}") from None


def _env_values(env: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """Parsed ``PRISM_*`` values, keyed by variable name: ``{name: (field, value)}``."""
    values: dict[str, tuple[str, Any]] = {}
    for name, (field, parse) in ENV_VARS.items():
        text = env.get(name)
        if not text:
            continue
        try:
            values[name] = (field, parse(text))
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return values


def _decode(values: dict[str, Any], sources: Mapping[str, str]) -> ServerConfig:
    """Decode merged values strictly; rephrase every error as ``field: reason (from X)``."""
    try:
        return msgspec.convert(values, ServerConfig, strict=True)
    except FieldError as exc:
        raise ConfigError(_with_source(str(exc), exc.field, sources)) from None
    except msgspec.ValidationError as exc:
        field, reason = rephrase(str(exc))
        field = field or "config"
        raise ConfigError(_with_source(f"{field}: {reason}", field, sources)) from None


def _with_source(line: str, field: str, sources: Mapping[str, str]) -> str:
    top = re.split(r"[.\[]", field, maxsplit=1)[0]
    source = sources.get(top)
    return f"{line} (from {source})" if source else line
