"""Declared needs: what applications ask of their namespaces (ADR-002).

A needs file is TOML::

    [[needs]]
    namespace = "profiles"
    abstraction = "keyvalue"   # keyvalue (default), timeseries, pubsub
    read_rps = 20000           # peak calls/s that read
    write_rps = 2000           # peak calls/s that write
    item_bytes = 512
    records = 5_000_000
    p99_ms = 10
    durability = "durable"     # or "cache": memory allowed
    tenant = "web"             # optional: isolation group
    backend = "postgres"       # optional: the backend it must have

or a ``.proto`` file whose messages carry ``option (prism.namespace) = {...}``
and whose services carry ``option (prism.namespaces) = {...}`` (any number),
with the same fields (``prism/proto/options.proto``; ``name`` for
``namespace``). A proto file is compiled by grpcio-tools' protoc (the
optional extra ``plan``), never parsed by hand: its imports resolve against
the file's own directory, ``--proto-path`` folders, Prism's package (for
``prism/proto/options.proto``) and protobuf's well-known types.

Every value is checked here, with one line naming the need and the field.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from prism.errors import ConfigError

ABSTRACTIONS: Final = ("keyvalue", "timeseries", "pubsub")
BACKENDS: Final = {
    "keyvalue": ("memory", "sqlite", "postgres", "redis"),
    "timeseries": ("memory", "sqlite", "postgres"),
    "pubsub": ("memory", "nats"),
}
DURABILITIES: Final = ("durable", "cache")
_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Bounds that catch a typo (a figure meant per day, a size in bits), not taste.
MAX_RPS: Final = 10_000_000.0
MAX_ITEM_BYTES: Final = 64 * 1024 * 1024
MAX_RECORDS: Final = 10**12
MAX_P99_MS: Final = 60_000.0


class Need(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One namespace's declared needs (see the module docstring)."""

    namespace: str
    abstraction: Literal["keyvalue", "timeseries", "pubsub"] = "keyvalue"
    read_rps: float = 0.0
    write_rps: float = 0.0
    item_bytes: int = 512
    records: int = 0
    p99_ms: float = 10.0
    durability: Literal["durable", "cache"] = "durable"
    tenant: str | None = None
    backend: str | None = None  # the backend it must have (an application that relies on it)


class _NeedsFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    needs: list[Need] = []


def load_needs(path: Path, proto_paths: Sequence[Path] = ()) -> list[Need]:
    """The needs declared in ``path`` (TOML, or ``.proto``), checked; ConfigError with one line if not."""
    if path.suffix == ".proto":
        return check_needs(_needs_of_proto(path, proto_paths), str(path))
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        parsed = msgspec.toml.decode(raw, type=_NeedsFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not TOML: {exc}") from None
    return check_needs(parsed.needs, str(path))


def check_needs(needs: Iterable[Need], source: str) -> list[Need]:
    """``needs`` if every value is in range and no namespace is declared twice."""
    out: list[Need] = []
    seen: set[str] = set()
    for i, need in enumerate(needs):
        where = f"{source}: needs[{i}]"
        if not _NAME.match(need.namespace):
            raise ConfigError(f"{where}.namespace: {need.namespace!r} is not a namespace name")
        where = f"{source}: need {need.namespace!r}"
        if need.namespace in seen:
            raise ConfigError(f"{where}: declared twice")
        seen.add(need.namespace)
        for field, value, top in (
            ("read_rps", need.read_rps, MAX_RPS),
            ("write_rps", need.write_rps, MAX_RPS),
            ("item_bytes", need.item_bytes, MAX_ITEM_BYTES),
            ("records", need.records, MAX_RECORDS),
        ):
            if not 0 <= value <= top:
                raise ConfigError(f"{where}: {field} = {value} out of range (0 to {top:g})")
        if need.read_rps + need.write_rps <= 0:
            raise ConfigError(f"{where}: declares no load (read_rps and write_rps are both 0)")
        if not 0 < need.p99_ms <= MAX_P99_MS:
            raise ConfigError(f"{where}: p99_ms = {need.p99_ms} out of range (> 0, at most {MAX_P99_MS:g})")
        if need.tenant is not None and not _NAME.match(need.tenant):
            raise ConfigError(f"{where}: tenant {need.tenant!r} is not a tenant name")
        if need.backend is not None and need.backend not in BACKENDS[need.abstraction]:
            raise ConfigError(
                f"{where}: backend {need.backend!r}: a {need.abstraction} namespace has "
                f"{', '.join(BACKENDS[need.abstraction])}"
            )
        if need.backend == "memory" and need.durability == "durable":
            raise ConfigError(f'{where}: backend "memory" is not durable: say durability = "cache"')
        out.append(need)
    if not out:
        raise ConfigError(f"{source}: declares no needs")
    return out


# ---------------------------------------------------------------- .proto files


def _needs_of_proto(path: Path, proto_paths: Sequence[Path]) -> list[Need]:
    try:
        from grpc_tools import protoc
    except ImportError:
        raise ConfigError(
            f"{path}: reading needs from .proto files takes grpcio-tools: pip install 'prism-gateway[plan]'"
        ) from None
    from google.protobuf import descriptor_pb2

    from prism.proto import options_pb2  # noqa: F401 (registers the extensions before the parse)

    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    package_root = Path(__file__).resolve().parent.parent.parent  # holds prism/proto/options.proto
    well_known = Path(protoc.__file__).parent / "_proto"
    roots = [path.parent.resolve(), *(p.resolve() for p in proto_paths), package_root, well_known]
    with tempfile.TemporaryDirectory(prefix="prism-plan-") as tmp:
        out = Path(tmp) / "set.pb"
        args = ["protoc", *(f"-I{r}" for r in roots), "--include_imports", f"--descriptor_set_out={out}"]
        errors = Path(tmp) / "errors"
        code = _run_protoc(protoc, [*args, str(path.resolve())], errors)
        if code != 0:
            detail = errors.read_text(errors="replace").strip().splitlines() if errors.exists() else []
            raise ConfigError(f"{path}: protoc failed: {detail[0] if detail else f'exit {code}'}")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    needs: list[Need] = []
    for file in files.file:
        for owner, options in _declarations(file):
            for declared in options:
                needs.append(_need_of(declared, f"{path}: {owner}"))
    return needs


def _run_protoc(protoc: Any, args: list[str], errors: Path) -> int:
    """protoc's exit code; what it printed on stderr goes to ``errors``
    (protoc writes to the process's fd 2: it is pointed at the file meanwhile)."""
    import os

    saved = os.dup(2)
    try:
        with errors.open("wb") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                return int(protoc.main(args))
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _declarations(file: Any) -> Iterator[tuple[str, list[Any]]]:
    """(where, [NamespaceNeeds, ...]) of every message and service of ``file`` that declares some."""
    from prism.proto import options_pb2

    def messages(prefix: str, types: Iterable[Any]) -> Iterator[tuple[str, list[Any]]]:
        for message in types:
            name = f"{prefix}{message.name}"
            if message.options.HasExtension(options_pb2.namespace):
                yield f"message {name}", [message.options.Extensions[options_pb2.namespace]]
            yield from messages(f"{name}.", message.nested_type)

    package = f"{file.package}." if file.package else ""
    yield from messages(package, file.message_type)
    for service in file.service:
        declared = list(service.options.Extensions[options_pb2.namespaces])
        if declared:
            yield f"service {package}{service.name}", declared


def _need_of(declared: Any, where: str) -> Need:
    """A ``prism.NamespaceNeeds`` option as a Need (proto3 zero means: the default)."""
    fields: dict[str, Any] = {"namespace": declared.name}
    for field in ("abstraction", "durability", "tenant", "backend"):
        value = getattr(declared, field)
        if value:
            fields[field] = value
    for field in ("read_rps", "write_rps", "item_bytes", "records", "p99_ms"):
        value = getattr(declared, field)
        if value:
            fields[field] = value
    if not declared.name:
        raise ConfigError(f"{where}: prism.namespace option without a name")
    try:
        return msgspec.convert(fields, Need)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {exc}") from None


__all__ = ["ABSTRACTIONS", "BACKENDS", "DURABILITIES", "Need", "check_needs", "load_needs"]
