"""The one way a backend turns its driver's exceptions into the gateway's.

Each engine package keeps an error table (``prism/backends/<engine>/errors.py``)
built once with ``map_exceptions``, and wraps every driver call in it::

    ERRORS = map_exceptions({
        resp.PoolTimeout: ResourceExhausted,
        resp.ReplyError: reply_error,
        resp.RedisError: Unavailable,
    })

    with ERRORS:
        reply = await pool.call("PING")

httpcore's pattern (``httpcore/_exceptions.py``), with one difference: the
manager is a class with ``__slots__`` whose one instance is reused, not a
``@contextmanager`` generator built per use. It wraps every statement a
backend runs, and the generator form builds a generator, its frame and a
wrapper object on every use, which measurably slowed PostgreSQL's hot read
path (commit 5f5a12d has the measurement). It keeps no state between
``__enter__`` and ``__exit__``, so one instance serves every task at once.

A table maps an exception type (or a tuple of types) to what it becomes:

- a ``PrismError`` subclass: raised with the driver exception's text, which
  the drivers write to be shown to a client ("redis: connection lost: ...");
- a function of the exception that returns the exception to raise (for
  errors whose status depends on their content, like a SQLSTATE);
- ``None``: raised unchanged (a driver's misuse error is our bug, and must
  reach the dispatcher's "log once, answer INTERNAL" as it is).

Entries are tried in order, so a subclass goes before its base. Anything not
in the table passes through untouched (``trio.Cancelled`` among others).
The driver exception is chained (``raise ... from exc``) for the log.
``prism.rpc.server`` is still the one place that turns the result into a
gRPC status.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TypeAlias

from prism.errors import PrismError

ExceptionTypes: TypeAlias = type[BaseException] | tuple[type[BaseException], ...]
# A factory takes the exception its key matched (typed by each table as that
# type, hence Any here) and returns the one to raise.
Factory: TypeAlias = Callable[[Any], BaseException]
Target: TypeAlias = type[PrismError] | Factory | None


def _factory(target: Target) -> Factory | None:
    if not isinstance(target, type):
        return target
    cls = target
    return lambda exc: cls(str(exc))


class map_exceptions:
    """``with table:`` re-raises the exceptions ``table`` names as gateway errors.

    Named in lower case, like ``contextlib.suppress``: it reads as a function
    that builds a context manager."""

    __slots__ = ("_rules",)

    def __init__(self, table: Mapping[ExceptionTypes, Target]) -> None:
        self._rules = tuple((kind, _factory(target)) for kind, target in table.items())

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            return
        for kinds, factory in self._rules:
            if isinstance(exc, kinds):
                if factory is None:
                    return
                raise factory(exc) from exc
