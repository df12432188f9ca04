"""The demo's picture: one self-contained HTML file (inline SVG, no scripts fetched).

Accuracy over the event stream per model version, the drift signals the monitor raised,
and markers where drift was injected, detected, a retrain requested and a version promoted.
The data behind the picture is embedded as JSON (id="demo-data") so tests and people can
read exactly what was drawn.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import orjson

WIDTH, HEIGHT = 960, 420
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 30, 75
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
MARKER_COLORS = {
    "drift injected": "#444",
    "drift detected": "#d62728",
    "retrain requested": "#ff7f0e",
    "promoted": "#2ca02c",
}


@dataclass
class Picture:
    title: str
    series: dict[str, list[tuple[int, float]]]  # name -> (event index, accuracy)
    markers: list[dict[str, Any]] = field(default_factory=list)  # {label, index, detail}
    signals: list[dict[str, Any]] = field(default_factory=list)  # {index, signal, severity}
    notes: list[str] = field(default_factory=list)


def _x(index: float, x_max: float) -> float:
    return LEFT + (WIDTH - LEFT - RIGHT) * (index / x_max if x_max else 0)


def _y(value: float, lo: float, hi: float) -> float:
    return TOP + (HEIGHT - TOP - BOTTOM) * (1 - (value - lo) / (hi - lo))


def render(picture: Picture) -> str:
    points = [i for s in picture.series.values() for i, _ in s]
    x_max = max([*points, *(m["index"] for m in picture.markers), 1])
    values = [v for s in picture.series.values() for _, v in s]
    lo = min(0.5, min(values, default=0.5))
    lo = max(0.0, round(lo - 0.05, 1))
    hi = 1.0
    svg: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">'
    ]
    svg.append(
        f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
        'fill="#fafafa" stroke="#ccc"/>'
    )
    for tick in range(int(lo * 10), 11):
        v = tick / 10
        y = _y(v, lo, hi)
        svg.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
        )
        svg.append(f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    for k in range(6):
        idx = x_max * k / 5
        x = _x(idx, x_max)
        svg.append(
            f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{int(idx):,}</text>'
        )
    svg.append(
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - BOTTOM + 34}" text-anchor="middle">'
        "event index (stream order)</text>"
    )
    svg.append(
        f'<text x="16" y="{(TOP + HEIGHT - BOTTOM) / 2}" transform="rotate(-90 16 '
        f'{(TOP + HEIGHT - BOTTOM) / 2})" text-anchor="middle">accuracy (rolling, labelled)</text>'
    )
    for sig in picture.signals:
        x = _x(sig["index"], x_max)
        svg.append(
            f'<circle cx="{x:.1f}" cy="{TOP + 8}" r="3" fill="#d62728" opacity="0.6">'
            f"<title>{html.escape(str(sig['signal']))} ({html.escape(str(sig.get('severity', '')))})"
            "</title></circle>"
        )
    for n, marker in enumerate(picture.markers):
        x = _x(marker["index"], x_max)
        color = MARKER_COLORS.get(marker["label"], "#444")
        svg.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" stroke="{color}" '
            'stroke-dasharray="5,4" stroke-width="1.5"/>'
        )
        svg.append(
            f'<text x="{x + 4:.1f}" y="{TOP + 24 + 14 * (n % 4)}" fill="{color}">'
            f"{html.escape(marker['label'])}</text>"
        )
    legend_x = LEFT + 10
    for n, (name, series) in enumerate(picture.series.items()):
        color = COLORS[n % len(COLORS)]
        path = " ".join(
            f"{'M' if i == 0 else 'L'}{_x(idx, x_max):.1f},{_y(v, lo, hi):.1f}"
            for i, (idx, v) in enumerate(series)
        )
        if path:
            svg.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        ly = HEIGHT - 10
        svg.append(f'<rect x="{legend_x}" y="{ly - 9}" width="12" height="3" fill="{color}"/>')
        svg.append(f'<text x="{legend_x + 16}" y="{ly - 4}">{html.escape(name)}</text>')
        legend_x += 20 + 8 * len(name)
    svg.append("</svg>")
    data = orjson.dumps(
        {
            "series": picture.series,
            "markers": picture.markers,
            "signals": picture.signals,
            "notes": picture.notes,
        }
    ).decode()
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in picture.notes)
    embedded = data.replace("</", "<\\/")  # JSON inside <script> must not close it
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(picture.title)}</title>"
        "<style>body{font-family:sans-serif;margin:24px;color:#222}li{margin:2px 0}</style></head><body>"
        f"<h2>{html.escape(picture.title)}</h2>{''.join(svg)}<ul>{notes}</ul>"
        f'<script type="application/json" id="demo-data">{embedded}</script>'
        "</body></html>"
    )


def read_data(page: str) -> dict[str, Any]:
    """The data a rendered page embeds (for tests and tools)."""
    start = page.index('id="demo-data">') + len('id="demo-data">')
    end = page.index("</script>", start)
    result: dict[str, Any] = orjson.loads(page[start:end].replace("<\\/", "</"))
    return result
