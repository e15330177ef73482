"""Audit lines: their JSON fields, their level, and the bound on denials (counted, never silent)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from prism.log import JsonFormatter
from prism.rpc.call import Caller
from prism.security.audit import MAX_NAMESPACE_CHARS, Audit


class Lines:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    def read(self) -> list[dict[str, Any]]:
        out = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        self.stream.seek(0)
        self.stream.truncate()
        return out


@pytest.fixture
def lines() -> Iterator[Lines]:
    """prism's JSON log, as ``prism serve`` sets it up, at level ERROR."""
    captured = Lines()
    handler = logging.StreamHandler(captured.stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("prism")
    saved = root.handlers[:], root.level, root.propagate
    root.handlers[:] = [handler]
    root.setLevel(logging.ERROR)  # audit lines are not diagnostics: they get out anyway
    root.propagate = False
    try:
        yield captured
    finally:
        root.handlers[:], level, root.propagate = saved
        root.setLevel(level)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_denial_and_an_allowed_write_are_one_json_line_each(lines: Lines) -> None:
    audit = Audit()
    audit.denied("alice", "10.0.0.7:51000", "ledger", "KeyValue/PutItems", "PERMISSION_DENIED", "no rule")
    audit.allowed_write(Caller("bob", "[::1]:4000"), "orders-1", "KeyValue/DeleteItems")
    denied, write = lines.read()
    assert denied.pop("ts") and denied.pop("pid")
    assert denied == {
        "level": "warning",
        "logger": "prism.audit",
        "msg": "denied",
        "principal": "alice",
        "peer": "10.0.0.7:51000",
        "namespace": "ledger",
        "method": "KeyValue/PutItems",
        "status": "PERMISSION_DENIED",
        "reason": "no rule",
    }
    assert {k: write[k] for k in ("level", "msg", "principal", "peer", "namespace", "method")} == {
        "level": "info",
        "msg": "write",
        "principal": "bob",
        "peer": "[::1]:4000",
        "namespace": "orders-1",
        "method": "KeyValue/DeleteItems",
    }
    assert "status" not in write and "reason" not in write


def test_a_namespace_from_a_request_is_cut_to_a_bounded_length(lines: Lines) -> None:
    Audit().denied(None, "", "n" * 100_000, "KeyValue/GetItems", "UNAUTHENTICATED", "no credentials")
    [line] = lines.read()
    assert line["principal"] is None
    assert line["namespace"] == "n" * MAX_NAMESPACE_CHARS + "..."


def test_denials_past_the_rate_are_counted_and_reported_on_the_next_line(lines: Lines) -> None:
    clock = FakeClock()
    audit = Audit(denials_per_s=10, clock=clock)
    for n in range(25):
        audit.denied(None, "", f"ns{n}", "KeyValue/GetItems", "UNAUTHENTICATED", "no credentials")
    written = lines.read()
    assert [line["namespace"] for line in written] == [f"ns{n}" for n in range(10)]  # the burst
    assert audit.dropped == 15
    # Writes are never dropped, and the first line after the drop says how many went.
    audit.allowed_write(Caller("bob", ""), "w", "KeyValue/PutItems")
    clock.now += 0.5  # five more denial lines' worth
    for n in range(7):
        audit.denied(None, "", f"later{n}", "KeyValue/GetItems", "UNAUTHENTICATED", "no credentials")
    written = lines.read()
    assert [(line["msg"], line["namespace"], line.get("dropped")) for line in written] == [
        ("write", "w", 15),
        *[("denied", f"later{n}", None) for n in range(5)],
    ]
    assert audit.dropped == 17
    clock.now += 10
    audit.denied(None, "", "again", "KeyValue/GetItems", "UNAUTHENTICATED", "no credentials")
    [line] = lines.read()
    assert (line["namespace"], line["dropped"]) == ("again", 2)
