"""A full disk is logged once a minute per namespace, naming the file (fake clock)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from prism.backends.sqlite.errors import FULL_LOG_INTERVAL_S, FullDiskLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "prism.backends.sqlite"]


def test_one_line_per_namespace_per_minute(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    a = FullDiskLog("a", Path("/data/a.sqlite3"), clock)
    b = FullDiskLog("b", Path("/data/b.sqlite3"), clock)
    with caplog.at_level(logging.ERROR, "prism.backends.sqlite"):
        for _ in range(100):
            a.note()
            b.note()
            clock.now += 0.5  # 50 s in all
        assert lines(caplog) == [
            "namespace a: no space left for /data/a.sqlite3: writes answer RESOURCE_EXHAUSTED, reads go on",
            "namespace b: no space left for /data/b.sqlite3: writes answer RESOURCE_EXHAUSTED, reads go on",
        ]
        clock.now = 1000.0 + FULL_LOG_INTERVAL_S - 0.001
        a.note()
        assert len(lines(caplog)) == 2
        clock.now = 1000.0 + FULL_LOG_INTERVAL_S
        a.note()
        assert lines(caplog)[2] == (
            "namespace a: no space left for /data/a.sqlite3: writes answer RESOURCE_EXHAUSTED, "
            "reads go on (100 more since the last line)"
        )
