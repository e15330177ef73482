"""``bench/overload.py`` refuses bad options with one line naming the option
and exit 2, before it starts anything."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # its sibling modules (bench_load, bench_servers)
    spec = importlib.util.spec_from_file_location("overload", REPO / "bench" / "overload.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "overload", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--saturation-inflight", "16,lots"], "--saturation-inflight: '16,lots' is not a list of numbers"),
        (["--saturation-inflight", "32,0"], "--saturation-inflight: '32,0': each must be at least 1"),
        (["--server-share", "1.5"], "--server-share: 1.5 is not a share of one CPU"),
        (["--saturation-repeats", "0"], "--saturation-repeats: 0 must be at least 1"),
        (["--flood-rounds", "0"], "--flood-rounds: 0 must be at least 1"),
        (["--pairs", "0"], "--pairs: 0 must be at least 1"),
        (["--flood-rps", "0"], "--flood-rps: 0 must be more than 0"),
        (["--flood-rps", "-5"], "--flood-rps: -5 must be more than 0"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    main = script(monkeypatch).main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert expected in err[-1]


def test_each_2x_step_is_judged_against_the_saturation_before_and_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The machine speeds up steadily: 1,000, 1,200, 1,400, 1,600 calls/s.
    bracketed_pairs = script(monkeypatch).bracketed_pairs
    saturations = iter([1000.0, 1200.0, 1400.0, 1600.0])
    offered: list[float] = []

    def offer(rate: float) -> dict[str, float]:
        offered.append(rate)
        return {"goodput_per_s": 990.0}

    pairs = bracketed_pairs(lambda: next(saturations), offer, 3, 2.0)
    assert offered == [2000.0, 2400.0, 2800.0]  # twice the saturation just before
    assert [(p["saturation_before_per_s"], p["saturation_after_per_s"]) for p in pairs] == [
        (1000.0, 1200.0),
        (1200.0, 1400.0),
        (1400.0, 1600.0),
    ]
    assert [p["saturation_per_s"] for p in pairs] == [1100.0, 1300.0, 1500.0]
    assert [p["load"] for p in pairs] == [2.0, 2.0, 2.0]
