"""``report.html`` and the plots: one self-contained page a planner can open anywhere.

The plots (matplotlib, the optional extra ``report``: ``pip install
'prism-gateway[report]'``) are written as PNG files and embedded in the page
as base64, so the page needs no network and no other file:

- ``throughput.png``: calls/s against the ladder (calls in flight, or
  offered calls/s with the line where answered = offered);
- ``latency.png``: p50/p90/p99/p99.9 against calls/s, with the saturation
  point and the p99 at 80% of it marked;
- ``cpu.png``: the server's CPU per call, by process, per step.

Without matplotlib the page holds the tables only, and says how to get plots.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from prism.benchmark.results import Results, Step

INSTALL_HINT = "plots need matplotlib: pip install 'prism-gateway[report]'"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(results: Results, out: Path) -> list[Path]:
    """Write ``report.html`` (and the PNGs, when matplotlib is there); the files written."""
    images: dict[str, bytes] = {}
    if have_matplotlib() and results.steps:
        images = _plots(results)
    written = []
    for name, png in images.items():
        path = out / f"{name}.png"
        path.write_bytes(png)
        written.append(path)
    page = out / "report.html"
    page.write_text(_page(results, images))
    written.append(page)
    return written


def _plots(results: Results) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = results.steps
    closed = steps[0].mode == "closed"
    out = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [_num(s.concurrency if closed else s.offered_calls_per_s) for s in steps]
    ax.plot(xs, [s.calls_per_s for s in steps], "o-", label="answered OK")
    if not closed:
        ax.plot(xs, xs, ":", color="grey", label="offered")
    ax.set_xlabel("calls in flight (closed loop)" if closed else "offered calls/s (open loop)")
    ax.set_ylabel("calls/s")
    if closed:
        ax.set_xscale("log", base=2)
    ax.set_title("Throughput")
    _mark_saturation_x(ax, results)
    ax.legend()
    ax.grid(alpha=0.3)
    out["throughput"] = _png(fig, plt)

    fig, ax = plt.subplots(figsize=(7, 4))
    rate = [s.calls_per_s for s in steps]
    for name, field in (("p50", "p50_us"), ("p90", "p90_us"), ("p99", "p99_us"), ("p99.9", "p999_us")):
        values = [_ms(getattr(s.latency, field)) for s in steps]
        ax.plot(rate, values, "o-", label=name)
    sat = results.saturation
    if sat is not None:
        ax.axvline(sat.calls_per_s, color="red", ls="--", label=f"saturation {sat.calls_per_s:,.0f}/s")
        if sat.at_80pct.p99_us is not None:
            ax.plot([sat.at_80pct.calls_per_s], [sat.at_80pct.p99_us / 1000], "D", color="black", ms=9,
                    label=f"p99 at 80%: {sat.at_80pct.p99_us / 1000:.2f} ms")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("calls/s answered")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency percentiles vs throughput")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    out["latency"] = _png(fig, plt)

    fig, ax = plt.subplots(figsize=(7, 4))
    roles = sorted({r for s in steps for r in (s.cpu_us_per_call or {}) if r != "total"})
    labels = [_step_label(s) for s in steps]
    bottom = [0.0] * len(steps)
    for role in roles:
        values = [float((s.cpu_us_per_call or {}).get(role, 0.0)) for s in steps]
        ax.bar(labels, values, bottom=bottom, label=role)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    if not roles:
        ax.text(0.5, 0.5, "no server CPU figures (--target: not our process)", ha="center",
                transform=ax.transAxes)  # fmt: skip
    else:
        ax.legend(fontsize="small")
    ax.set_ylabel("server CPU per call (us)")
    ax.set_xlabel("step")
    ax.set_title("CPU per call by process")
    ax.grid(alpha=0.3, axis="y")
    out["cpu"] = _png(fig, plt)
    return out


def _mark_saturation_x(ax: Any, results: Results) -> None:
    sat = results.saturation
    if sat is None:
        return
    ax.axhline(sat.calls_per_s, color="red", ls="--", label=f"saturation {sat.calls_per_s:,.0f}/s")
    ax.axhline(sat.at_80pct.calls_per_s, color="orange", ls=":", label="80% of saturation")


def _png(fig: Any, plt: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _ms(us: float | None) -> float:
    return math.nan if us is None else us / 1000


def _num(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _step_label(s: Step) -> str:
    return f"c{s.concurrency}" if s.mode == "closed" else f"{s.offered_calls_per_s:g}/s"


def _page(results: Results, images: dict[str, bytes]) -> str:
    e = html.escape
    title = f"prism bench: {results.scenario.get('name', '')}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:3px 6px;"
        "text-align:right}th{background:#eee}img{max-width:100%}.bad{color:#b00}</style>",
        "</head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>{e(str(results.scenario.get('description', '')))}</p>",
        f"<p>Outcome: <b>{e(results.outcome)}</b>"
        + (f' <span class="bad">{e(results.failure)}</span>' if results.failure else "")
        + f". Started {e(results.started_at)}, scenario <code>{e(results.scenario_file)}</code>"
        + (" (--quick)" if results.quick else "")
        + ".</p>",
    ]
    sat = results.saturation
    if sat is not None:
        p99 = "n/a" if sat.at_80pct.p99_us is None else f"{sat.at_80pct.p99_us / 1000:.2f} ms"
        parts.append(
            f'<p id="saturation">Saturation: <b>{sat.calls_per_s:,.0f} calls/s</b> (step {sat.step + 1}); '
            f"p99 at 80% of it ({sat.at_80pct.calls_per_s:,.0f} calls/s): <b>{p99}</b> "
            f"({e(sat.at_80pct.method)}).</p>"
        )
    for warning in results.warnings:
        parts.append(f'<p class="bad">Warning: {e(warning)}</p>')
    if images:
        for name, png in images.items():
            data = base64.b64encode(png).decode()
            parts.append(f'<h2>{e(name.title())}</h2><img id="plot-{name}" alt="{name}" '
                         f'src="data:image/png;base64,{data}">')  # fmt: skip
    else:
        parts.append(f"<p><i>{e(INSTALL_HINT)}</i></p>")
    parts.append(_table(results))
    m = results.machine
    parts.append(
        "<h2>Machine</h2><p>"
        + e(f"{m.cpu_model} x {m.cpus}, kernel {m.kernel}, Python {m.python}, Prism {m.prism_version}, ")
        + e(f"backends {m.backend_versions}, h2load {m.h2load}; server CPUs {results.server.cpus}, ")
        + e(f"load CPUs {results.server.load_cpus}, {results.server.load_processes} load process(es)")
        + "</p></body></html>"
    )
    return "\n".join(parts) + "\n"


def _table(results: Results) -> str:
    head = ("step", "load", "generator", "calls/s", "errors", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
            "server CPU us/call", "cache hit ratio")  # fmt: skip
    rows = ["<h2>Steps</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for s in results.steps:
        lat = s.latency
        cells = (
            str(s.index + 1) + ("" if s.complete else " (cut)"),
            _step_label(s),
            s.load_generator,
            f"{s.calls_per_s:,.0f}",
            ", ".join(f"{k} {v}" for k, v in s.errors.items()) or "0",
            *(
                f"{v / 1000:.2f}" if v is not None else ""
                for v in (lat.p50_us, lat.p90_us, lat.p99_us, lat.p999_us)
            ),
            f"{s.cpu_us_per_call['total']:.1f}" if s.cpu_us_per_call else "",
            f"{s.backend.cache_hit_ratio:.3f}" if s.backend and s.backend.cache_hit_ratio is not None else "",
        )
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return "\n".join(rows) + "</table>"
