"""Prometheus text, as the admin port's ``/metrics`` serves it, read into samples."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterable

import msgspec


class Sample(msgspec.Struct, frozen=True):
    """One line of Prometheus text: ``name{labels} value``."""

    name: str
    labels: dict[str, str]
    value: float


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[Sample]:
    """Samples of a Prometheus text exposition (comments skipped)."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        labels = dict(_LABEL.findall(match.group(2) or ""))
        samples.append(Sample(match.group(1), labels, float(match.group(3))))
    return samples


def metric_sum(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def fetch_metrics(base_url: str, timeout_s: float = 10.0) -> list[Sample]:
    """The samples of ``BASE_URL/metrics`` (an admin port: all workers merged)."""
    with urllib.request.urlopen(f"{base_url.rstrip('/')}/metrics", timeout=timeout_s) as answer:
        return parse_metrics(answer.read().decode())
