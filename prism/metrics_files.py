"""Counters and histograms written as prometheus-client's multiprocess mode
writes them, without importing prometheus-client.

Under ``prism serve`` every process writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR`` and the admin process merges them into one page
with prometheus-client's ``MultiProcessCollector``. Writing them takes little:
a file per kind of metric and process (``counter_PID.db``,
``histogram_PID.db``) holding ``prometheus_client.mmap_dict.MmapedDict``'s
layout (a 4-byte used size, 4 bytes of padding, then entries of a 4-byte
key length, the key in UTF-8 padded to 8 bytes, a double value and a double
timestamp) under ``mmap_key``'s JSON keys. But importing prometheus-client
loads its HTTP exposition too (http.server, email, urllib, wsgiref: about
2.7 MB of every worker's and the supervisor's PSS), so ``prism.metrics``
writes through here in that mode, and uses prometheus-client itself only
in-process (tests, which read its registry).

Single-threaded, as prometheus-client's multiprocess values assume. A fork's
child (the worker template forks every worker) writes its own files, with
values starting from zero, as prometheus-client's do.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Sequence
from typing import Final

__all__ = ["Counter", "Histogram", "mark_process_dead"]

_INITIAL_BYTES: Final = 1 << 16
_USED: Final = struct.Struct("<i")
_ENTRY_HEAD: Final = struct.Struct("<i")
_VALUE: Final = struct.Struct("<dd")  # value, timestamp (0.0: none)
INF: Final = float("inf")


class _File:
    """One ``KIND_PID.db`` file, as ``MmapedDict`` lays it out."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        if size == 0:
            os.ftruncate(self._fd, _INITIAL_BYTES)
            size = _INITIAL_BYTES
        self._size = size
        self._map = mmap.mmap(self._fd, size)
        self._used = _USED.unpack_from(self._map, 0)[0] or 8
        self._map[0:4] = _USED.pack(self._used)
        self._positions: dict[str, int] = {}
        pos = 8  # a reused pid's file: its values go on from where they were
        while pos < self._used:
            (length,) = _ENTRY_HEAD.unpack_from(self._map, pos)
            key = self._map[pos + 4 : pos + 4 + length].decode()
            pos += 4 + length + (8 - (length + 4) % 8)
            self._positions[key] = pos
            pos += _VALUE.size

    def position(self, key: str) -> int:
        """Where ``key``'s value is (added, as 0, if new)."""
        pos = self._positions.get(key)
        if pos is None:
            encoded = key.encode()
            padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
            entry = _ENTRY_HEAD.pack(len(encoded)) + padded + _VALUE.pack(0.0, 0.0)
            while self._used + len(entry) > self._size:
                self._size *= 2
                os.ftruncate(self._fd, self._size)
                self._map.close()
                self._map = mmap.mmap(self._fd, self._size)
            self._map[self._used : self._used + len(entry)] = entry
            self._used += len(entry)
            self._map[0:4] = _USED.pack(self._used)  # whole bytes, never a torn size (as MmapedDict)
            pos = self._positions[key] = self._used - _VALUE.size
        return pos

    def read(self, pos: int) -> float:
        value: float = _VALUE.unpack_from(self._map, pos)[0]
        return value

    def write(self, pos: int, value: float) -> None:
        self._map[pos : pos + _VALUE.size] = _VALUE.pack(value, 0.0)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


class _Process:
    """This process's files; all reopened, and every value zeroed, after a fork."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.files: dict[str, _File] = {}
        self.values: list[_Value] = []

    def file(self, kind: str) -> _File:
        file = self.files.get(kind)
        if file is None:
            directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
            file = self.files[kind] = _File(os.path.join(directory, f"{kind}_{self.pid}.db"))
        return file

    def forked(self) -> None:
        # The parent's mappings stay the parent's: the child writes files of its own.
        self.pid = os.getpid()
        self.files = {}
        for value in self.values:
            value.value = 0.0
            value.pos = -1


_process: Final = _Process()
os.register_at_fork(after_in_child=_process.forked)


class _Value:
    """One sample's value, written through to this process's file."""

    __slots__ = ("key", "kind", "pos", "value")

    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind
        self.key = key
        self.value = 0.0
        self.pos = -1
        _process.values.append(self)

    def inc(self, amount: float) -> None:
        file = _process.file(self.kind)
        if self.pos < 0:
            self.pos = file.position(self.key)
            self.value = file.read(self.pos)
        self.value += amount
        file.write(self.pos, self.value)


def _key(metric: str, sample: str, labelnames: Sequence[str], labelvalues: Sequence[str], doc: str) -> str:
    # prometheus_client.mmap_dict.mmap_key
    return json.dumps([metric, sample, dict(zip(labelnames, labelvalues, strict=True)), doc], sort_keys=True)


def go_float(value: float) -> str:
    """A bucket bound as prometheus-client writes it (``utils.floatToGoString``)."""
    if value == INF:
        return "+Inf"
    if value == -INF:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(float(value))
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


class _CounterChild:
    __slots__ = ("_value",)

    def __init__(self, value: _Value) -> None:
        self._value = value

    def inc(self, amount: float = 1.0) -> None:
        self._value.inc(amount)


class Counter:
    """``prometheus_client.Counter``'s ``labels(...).inc()`` and ``inc()``."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self._name = name.removesuffix("_total")
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _CounterChild] = {}
        if not self._labelnames:  # shown as 0 from the start, as prometheus-client's
            self._self = self.labels()
            _process.file("counter").position(self._self._value.key)

    def labels(self, *values: str) -> _CounterChild:
        labels = tuple(str(v) for v in values)
        child = self._children.get(labels)
        if child is None:
            if len(labels) != len(self._labelnames):
                raise ValueError(f"{self._name}: {len(self._labelnames)} label values wanted, got {labels}")
            key = _key(self._name, self._name + "_total", self._labelnames, labels, self._doc)
            child = self._children[labels] = _CounterChild(_Value("counter", key))
        return child

    def inc(self, amount: float = 1.0) -> None:
        self._self.inc(amount)


class _HistogramChild:
    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, bounds: tuple[float, ...], total: _Value, buckets: list[_Value]) -> None:
        self._bounds = bounds
        self._sum = total
        self._buckets = buckets

    def observe(self, amount: float) -> None:
        # One bucket per observation: the collector makes them cumulative.
        self._sum.inc(amount)
        for bound, bucket in zip(self._bounds, self._buckets, strict=True):
            if amount <= bound:
                bucket.inc(1.0)
                break


class Histogram:
    """``prometheus_client.Histogram``'s ``labels(...).observe()``."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        bounds = tuple(float(b) for b in buckets)
        self._bounds = bounds if bounds and bounds[-1] == INF else (*bounds, INF)
        self._children: dict[tuple[str, ...], _HistogramChild] = {}

    def labels(self, *values: str) -> _HistogramChild:
        labels = tuple(str(v) for v in values)
        child = self._children.get(labels)
        if child is None:
            if len(labels) != len(self._labelnames):
                raise ValueError(f"{self._name}: {len(self._labelnames)} label values wanted, got {labels}")
            name, names = self._name, self._labelnames
            total = _Value("histogram", _key(name, name + "_sum", names, labels, self._doc))
            buckets = [
                _Value(
                    "histogram",
                    _key(name, name + "_bucket", (*names, "le"), (*labels, go_float(b)), self._doc),
                )
                for b in self._bounds
            ]
            child = self._children[labels] = _HistogramChild(self._bounds, total, buckets)
        return child


def mark_process_dead(pid: int) -> None:
    """Delete a dead process's live-gauge files (``prometheus_client.multiprocess.mark_process_dead``)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        for mode in ("livesum", "liveall"):
            try:
                os.remove(os.path.join(directory, f"gauge_{mode}_{pid}.db"))
            except FileNotFoundError:
                pass
