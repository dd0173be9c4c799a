"""Bar charts as inline SVG, drawn on the server: the usage page needs no script and no outside file.

One chart is one `<svg>` string: grouped bars per day (one bar per series), the largest value and
zero on the y axis, the first and last day on the x axis, and a `<title>` on every bar so a pointer
shows the exact figure without JavaScript. Every text is escaped; the SVG scales with its container.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from html import escape

_WIDTH, _HEIGHT = 640, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 8, 30, 26
_PLOT_WIDTH = _WIDTH - _LEFT - _RIGHT
_PLOT_HEIGHT = _HEIGHT - _TOP - _BOTTOM
_AXIS, _GRID, _TEXT = "#6b7280", "#e5e7eb", "#374151"


@dataclass(frozen=True, slots=True)
class Series:
    """One bar per day, in one colour."""

    name: str
    values: tuple[int, ...]
    colour: str


def bar_chart(
    title: str, days: Sequence[date], series: Sequence[Series], *, shown: Callable[[int], str] = str
) -> str:
    """An SVG of `series` per day; `shown` writes a value for people (e.g. bytes as "1.2 MiB")."""
    if any(len(s.values) != len(days) for s in series):
        raise ValueError("every series needs one value per day")
    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {_WIDTH} {_HEIGHT}"'
        ' width="100%" preserveAspectRatio="xMidYMid meet" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        *_legend(series),
    ]
    if not days:
        parts.append(_note("No days in this range"))
        parts.append("</svg>")
        return "".join(parts)
    top = max((v for s in series for v in s.values), default=0)
    parts += _axes(days, shown(top) if top else "0")
    if top == 0:
        parts.append(_note("No usage in this range"))
    else:
        parts += _bars(days, series, top, shown)
    parts.append("</svg>")
    return "".join(parts)


def _legend(series: Sequence[Series]) -> list[str]:
    parts = []
    x = _LEFT
    for s in series:
        parts.append(f'<rect x="{x}" y="8" width="12" height="12" fill="{escape(s.colour)}"/>')
        parts.append(f'<text x="{x + 16}" y="18" font-size="12" fill="{_TEXT}">{escape(s.name)}</text>')
        x += 24 + 8 * len(s.name)
    return parts


def _axes(days: Sequence[date], top_label: str) -> list[str]:
    bottom = _TOP + _PLOT_HEIGHT
    parts = [
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_WIDTH - _RIGHT}" y2="{_TOP}" stroke="{_GRID}"/>',
        f'<line x1="{_LEFT}" y1="{bottom}" x2="{_WIDTH - _RIGHT}" y2="{bottom}" stroke="{_AXIS}"/>',
        _label(_LEFT - 6, _TOP + 4, top_label, "end"),
        _label(_LEFT - 6, bottom + 4, "0", "end"),
        _label(_LEFT, _HEIGHT - 8, days[0].isoformat(), "start"),
    ]
    if len(days) > 1:
        parts.append(_label(_WIDTH - _RIGHT, _HEIGHT - 8, days[-1].isoformat(), "end"))
    return parts


def _bars(days: Sequence[date], series: Sequence[Series], top: int, shown: Callable[[int], str]) -> list[str]:
    slot = _PLOT_WIDTH / len(days)
    width = slot * 0.8 / len(series)
    bottom = _TOP + _PLOT_HEIGHT
    parts = []
    for index, day in enumerate(days):
        for position, s in enumerate(series):
            value = s.values[index]
            if value <= 0:
                continue
            height = max(1.0, _PLOT_HEIGHT * value / top)
            x = _LEFT + index * slot + slot * 0.1 + position * width
            tip = f"{day.isoformat()} {s.name}: {shown(value)}"
            parts.append(
                f'<rect x="{x:.1f}" y="{bottom - height:.1f}" width="{width:.1f}" height="{height:.1f}"'
                f' fill="{escape(s.colour)}"><title>{escape(tip)}</title></rect>'
            )
    return parts


def _label(x: float, y: float, text: str, anchor: str) -> str:
    return f'<text x="{x}" y="{y}" font-size="11" text-anchor="{anchor}" fill="{_TEXT}">{escape(text)}</text>'


def _note(text: str) -> str:
    x, y = _LEFT + _PLOT_WIDTH / 2, _TOP + _PLOT_HEIGHT / 2
    return f'<text x="{x}" y="{y}" font-size="13" text-anchor="middle" fill="{_AXIS}">{escape(text)}</text>'
