"""The usage page's charts: well-formed SVG for an empty range, one day and a month, bars in scale."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from datetime import date, timedelta

import pytest

from proxy.ui_charts import Series, bar_chart

SVG = "{http://www.w3.org/2000/svg}"
NOVEMBER = [date(2026, 11, 1) + timedelta(days=n) for n in range(30)]


def bars(svg: str) -> list[ElementTree.Element]:
    """The bars: rectangles that carry a tooltip (the legend's swatches do not)."""
    root = ElementTree.fromstring(svg)
    return [rect for rect in root.iter(f"{SVG}rect") if rect.find(f"{SVG}title") is not None]


def texts(svg: str) -> list[str]:
    return [node.text or "" for node in ElementTree.fromstring(svg).iter(f"{SVG}text")]


def test_an_empty_range_is_a_valid_svg_that_says_so() -> None:
    svg = bar_chart("Requests per day", [], [Series("requests", (), "#2563eb")])

    root = ElementTree.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    assert root.find(f"{SVG}title") is not None
    assert bars(svg) == []
    assert "No days in this range" in texts(svg)


def test_one_day_draws_one_bar_per_series_to_full_height_for_the_largest() -> None:
    day = date(2026, 11, 3)
    svg = bar_chart(
        "Requests per day",
        [day],
        [Series("requests", (40,), "#2563eb"), Series("cache hits", (10,), "#16a34a")],
    )

    drawn = bars(svg)
    assert len(drawn) == 2
    heights = [float(rect.attrib["height"]) for rect in drawn]
    assert heights[0] == pytest.approx(4 * heights[1], rel=0.01)
    assert [rect.find(f"{SVG}title").text for rect in drawn] == [  # type: ignore[union-attr]
        "2026-11-03 requests: 40",
        "2026-11-03 cache hits: 10",
    ]
    assert "2026-11-03" in texts(svg)
    assert "40" in texts(svg)  # the y axis names the largest value


def test_a_month_draws_every_non_zero_value_inside_the_view_box() -> None:
    uploaded = tuple(n * 1024 for n in range(30))  # day one uploaded nothing: no bar
    downloaded = tuple(2048 for _ in range(30))
    svg = bar_chart(
        "Bytes per day",
        NOVEMBER,
        [Series("uploaded", uploaded, "#9333ea"), Series("downloaded", downloaded, "#ea580c")],
        shown=lambda n: f"{n // 1024} KiB",
    )

    drawn = bars(svg)
    assert len(drawn) == 29 + 30
    width, height = (float(v) for v in ElementTree.fromstring(svg).attrib["viewBox"].split()[2:])
    for rect in drawn:
        x, y, w, h = (float(rect.attrib[name]) for name in ("x", "y", "width", "height"))
        assert 0 <= x and x + w <= width and 0 <= y and y + h <= height and h >= 1
    xs = [float(rect.attrib["x"]) for rect in drawn if rect.attrib["fill"] == "#ea580c"]
    assert xs == sorted(xs)  # days left to right
    assert {"2026-11-01", "2026-11-30", "29 KiB"} <= set(texts(svg))


def test_a_range_without_usage_draws_no_bars_and_says_so() -> None:
    svg = bar_chart("Requests per day", NOVEMBER[:7], [Series("requests", (0,) * 7, "#2563eb")])

    assert bars(svg) == []
    assert "No usage in this range" in texts(svg)


def test_every_text_is_escaped() -> None:
    hostile = '<script>alert("x")</script>&'
    svg = bar_chart(hostile, [date(2026, 11, 3)], [Series(hostile, (1,), '"red')])

    assert "<script>" not in svg
    root = ElementTree.fromstring(svg)  # still well-formed
    assert root.attrib["aria-label"] == hostile
    assert hostile in texts(svg)


def test_a_series_must_have_one_value_per_day() -> None:
    with pytest.raises(ValueError, match="one value per day"):
        bar_chart("Requests per day", NOVEMBER[:2], [Series("requests", (1,), "#2563eb")])
