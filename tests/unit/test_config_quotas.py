"""``limits`` on namespaces and tenants, and ``[overload]``: what loads, and
one line naming the field for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from prism.config import load_config
from prism.config.quotas import LimitsConfig, OverloadConfig

from .test_config import load_error, write


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def test_limits_and_overload_load_from_toml() -> None:
    path = write(
        Path("prism.toml"),
        """
[[namespaces]]
name = "profiles"
limits = { rps = 5000, burst = 1000, concurrency = 256 }

[[tenants]]
name = "payments"
limits = { rps = 20000, burst = 4000, concurrency = 1024 }
namespaces = [{ name = "ledger", limits = { concurrency = 8 } }]

[overload]
target_delay_ms = 10
interval_ms = 200
""",
    )
    cfg = load_config(path, {}, {})
    assert cfg.namespaces[0].limits == LimitsConfig(rps=5000, burst=1000, concurrency=256)
    assert cfg.tenants[0].limits == LimitsConfig(rps=20000, burst=4000, concurrency=1024)
    assert cfg.tenants[0].namespaces[0].limits == LimitsConfig(concurrency=8)
    assert cfg.overload == OverloadConfig(target_delay_ms=10, interval_ms=200)


def test_no_limits_by_default() -> None:
    cfg = load_config(None, {}, {})
    assert cfg.namespaces[0].limits is None
    assert cfg.overload == OverloadConfig(enabled=False, target_delay_ms=5.0, interval_ms=100.0)


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ("{ rps = 0 }", "namespaces[0].limits.rps: 0.0 out of range (> 0 and at most 1e+08)"),
        ("{ rps = -5 }", "namespaces[0].limits.rps: -5.0 out of range (> 0 and at most 1e+08)"),
        ("{ rps = nan }", "namespaces[0].limits.rps: nan out of range"),
        ("{ burst = 10 }", "namespaces[0].limits.burst: needs rps (burst is the size of the rps bucket)"),
        ("{ rps = 10, burst = 0 }", "namespaces[0].limits.burst: 0 out of range (1-100000000)"),
        ("{ concurrency = 0 }", "namespaces[0].limits.concurrency: 0 out of range (1-1000000)"),
        ("{ concurrency = -1 }", "namespaces[0].limits.concurrency: -1 out of range (1-1000000)"),
        ("{ rsp = 10 }", "rsp"),
        ('{ rps = "fast" }', "namespaces[0].limits.rps"),
    ],
)
def test_bad_namespace_limits_name_the_field(limits: str, expected: str) -> None:
    message = load_error(f'[[namespaces]]\nname = "profiles"\nlimits = {limits}\n')
    assert expected in message


def test_bad_tenant_limits_name_the_field() -> None:
    message = load_error('[[tenants]]\nname = "payments"\nlimits = { rps = 10, burst = -1 }\n')
    assert "tenants[0].limits.burst: -1 out of range (1-100000000)" in message


@pytest.mark.parametrize(
    ("overload", "expected"),
    [
        ("target_delay_ms = 0", "overload.target_delay_ms: 0.0 out of range (> 0 and at most 10000 ms)"),
        ("interval_ms = 0.5", "overload.interval_ms: 0.5 out of range (1-60000 ms)"),
        ("target_delay_ms = 50\ninterval_ms = 10", "overload.interval_ms: 10.0 is less than target_delay_ms"),
        ("window_ms = 10", "window_ms"),
    ],
)
def test_bad_overload_names_the_field(overload: str, expected: str) -> None:
    assert expected in load_error(f"[overload]\n{overload}\n")
