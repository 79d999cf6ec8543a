"""The two small charts of the overview, drawn here as SVG: no JavaScript library, nothing to download.

Both cover the last 24 hours in hourly bars: finished runs (done stacked on
error), and pickup latency (submission until a node started the run: median
bar, 95th percentile tick). Hour labels carry their UTC time in `data-time`,
which the page's script shows in the viewer's zone.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from html import escape
from typing import Iterable

from poltergust.dashboard.pipelines import Pipeline

HOURS = 24
WIDTH, HEIGHT = 520, 150
LEFT, RIGHT, TOP, BOTTOM = 34, 8, 10, 22
PICKUP_SAMPLE = 200
"""Newest finished runs without a summary in the listing whose result files are read for the latency chart."""


@dataclass(frozen=True)
class Hour:
    start: datetime
    values: tuple[float, ...]
    """Stacked values, bottom first."""
    mark: float | None = None
    """A tick above the bar (the 95th percentile)."""
    label: str = ""


def hours(now: datetime) -> list[datetime]:
    top = now.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    return [top - timedelta(hours=HOURS - 1 - i) for i in range(HOURS)]


def finished_per_hour(pipelines: Iterable[Pipeline], now: datetime) -> list[Hour]:
    """Done and error counts per hour, from the result files' times (no file is read)."""
    starts = hours(now)
    counts = {start: [0, 0] for start in starts}
    for pipeline in pipelines:
        if pipeline.result is None:
            continue
        start = pipeline.result.updated.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
        if start in counts:
            counts[start][0 if pipeline.state == "done" else 1] += 1
    return [Hour(start, (done, error), label=f"{done} done, {error} error") for start, (done, error) in counts.items()]


def recent_finished(pipelines: Iterable[Pipeline], now: datetime) -> list[Pipeline]:
    """The finished pipelines of the chart's window."""
    since = hours(now)[0]
    return [p for p in pipelines if p.result is not None and p.updated >= since]


def unsummarised(pipelines: Iterable[Pipeline]) -> list[Pipeline]:
    """The newest pipelines whose result objects carry no summary (written before they did): the latency chart
    reads their files, a bounded number of them."""
    return [p for p in pipelines if p.result is not None and not p.section][:PICKUP_SAMPLE]


def pickup_per_hour(pipelines: Iterable[Pipeline], now: datetime) -> list[Hour]:
    """Median and 95th percentile pickup latency per hour of submission."""
    starts = hours(now)
    samples: dict[datetime, list[float]] = {start: [] for start in starts}
    for pipeline in pipelines:
        pickup, submitted = pipeline.pickup, pipeline.submitted
        if pickup is None or submitted is None:
            continue
        start = submitted.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
        if start in samples:
            samples[start].append(max(0.0, pickup))
    chart = []
    for start, values in samples.items():
        if not values:
            chart.append(Hour(start, (0.0,)))
            continue
        values.sort()
        p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
        median = statistics.median(values)
        chart.append(Hour(start, (median,), p95, f"median {seconds(median)}, p95 {seconds(p95)}, {len(values)} runs"))
    return chart


def seconds(value: float) -> str:
    if value < 10:
        return f"{value:.2f} s"
    if value < 120:
        return f"{value:.0f} s"
    return f"{value / 60:.0f} min"


def svg(chart: list[Hour], title: str, classes: tuple[str, ...], unit: str = "") -> str:
    """Hourly bars, stacked bottom first with one CSS class per layer; `unit` formats the axis as seconds."""
    top = max([sum(hour.values) for hour in chart] + [hour.mark or 0 for hour in chart] + [0])
    scale = _nice(top)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / len(chart)
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
             f"<title>{escape(title)}</title>"]
    for fraction in (0, 0.5, 1):
        y = TOP + plot_h * (1 - fraction)
        value = scale * fraction
        text = seconds(value) if unit == "s" and value else f"{value:g}" if unit or value == int(value) else ""
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="axis" x="{LEFT - 4}" y="{y + 3:.1f}" text-anchor="end">{escape(text)}</text>')
    for index, hour in enumerate(chart):
        x = LEFT + index * step + step * 0.15
        width = step * 0.7
        y = TOP + plot_h
        parts.append(f'<g><title data-time="{hour.start.isoformat()}">{escape(hour.label or "none")}</title>')
        for value, css in zip(hour.values, classes):
            height = plot_h * value / scale if scale else 0
            if height > 0:
                y -= height
                parts.append(f'<rect class="{css}" x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" '
                             f'height="{height:.1f}" rx="1.5"/>')
        if hour.mark is not None and scale:
            mark_y = TOP + plot_h * (1 - hour.mark / scale)
            parts.append(f'<line class="mark" x1="{x:.1f}" x2="{x + width:.1f}" y1="{mark_y:.1f}" '
                         f'y2="{mark_y:.1f}"/>')
        parts.append(f'<rect class="hit" x="{LEFT + index * step:.1f}" y="{TOP}" width="{step:.1f}" '
                     f'height="{plot_h}"/></g>')
        if index % 6 == 0:
            parts.append(f'<text class="axis hour" x="{x + width / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle" '
                         f'data-time="{hour.start.isoformat()}" data-format="hour">'
                         f'{hour.start:%H:%M}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _nice(top: float) -> float:
    """A round axis maximum at or above `top`."""
    if top <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(top))
    for factor in (1, 2, 2.5, 5, 10):
        if top <= factor * magnitude:
            return factor * magnitude
    return top
