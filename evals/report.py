"""Self-contained HTML reports (inline SVG plots, inline CSS, no scripts) and JSON summaries."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top} th{background:#f4f4f4} .bad{color:#b00020;font-weight:600} .ok{color:#0a7a28;font-weight:600}
.warn{color:#a66300;font-weight:600} .plots{display:flex;flex-wrap:wrap;gap:1em} figure{margin:0}
figcaption{font-size:.9em;color:#555} code{background:#f4f4f4;padding:0 .2em} td.text{max-width:420px;
overflow-wrap:anywhere}
"""
_W, _H, _PAD = 340, 180, 32


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "–"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def histogram_svg(
    values: Sequence[float], title: str, bins: int = 20, low: float | None = None, high: float | None = None
) -> str:
    """A histogram as an inline SVG figure."""
    if not values:
        return _empty(title)
    low = min(values) if low is None else low
    high = max(values) if high is None else high
    if high <= low:
        high = low + 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - low) / (high - low) * bins)))] += 1
    top = max(counts) or 1
    width = (_W - 2 * _PAD) / bins
    bars = "".join(
        f'<rect x="{_PAD + i * width:.1f}" y="{_H - _PAD - c / top * (_H - 2 * _PAD):.1f}" width="{width - 1:.1f}" '
        f'height="{c / top * (_H - 2 * _PAD):.1f}" fill="#4a78c2"><title>{c}</title></rect>'
        for i, c in enumerate(counts)
    )
    axis = (
        f'<text x="{_PAD}" y="{_H - 10}" font-size="10">{low:.3g}</text>'
        f'<text x="{_W - _PAD}" y="{_H - 10}" font-size="10" text-anchor="end">{high:.3g}</text>'
        f'<text x="4" y="{_PAD}" font-size="10">{top}</text>'
    )
    return _figure(title, bars + axis + _frame(), f"n = {len(values)}")


def lines_svg(series: Mapping[str, Sequence[float | None]], title: str, labels: Sequence[str] = ()) -> str:
    """One or more lines over the same x positions (runs), as an inline SVG figure."""
    points = [v for vs in series.values() for v in vs if v is not None]
    if not points:
        return _empty(title)
    low, high = min(points), max(points)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    n = max(len(vs) for vs in series.values())
    colours = ("#4a78c2", "#d9534f", "#2e9d5b", "#a66300", "#7a4ac2", "#555")
    out = []
    legend = []
    for k, (name, vs) in enumerate(series.items()):
        colour = colours[k % len(colours)]
        xy = [
            (_PAD + (i / max(1, n - 1)) * (_W - 2 * _PAD), _H - _PAD - (v - low) / (high - low) * (_H - 2 * _PAD))
            for i, v in enumerate(vs)
            if v is not None
        ]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in xy]
        legend.append(f'<tspan fill="{colour}">■ {_e(name)}</tspan> ')
    axis = (
        f'<text x="4" y="{_PAD}" font-size="10">{high:.3g}</text>'
        f'<text x="4" y="{_H - _PAD}" font-size="10">{low:.3g}</text>'
        f'<text x="{_PAD}" y="{_H - 10}" font-size="10">{"".join(legend)}</text>'
    )
    caption = f"runs: {', '.join(labels)}" if labels else ""
    return _figure(title, "".join(out) + axis + _frame(), caption)


def bars_svg(values: Mapping[str, float | None], title: str) -> str:
    """Horizontal bars for values in [0, 1] (rates), as an inline SVG figure."""
    kept = {k: float(v) for k, v in values.items() if isinstance(v, int | float) and math.isfinite(v)}
    if not kept:
        return _empty(title)
    height = 20 * len(kept) + 20
    rows = "".join(
        f'<text x="4" y="{20 * i + 24}" font-size="11">{_e(k)}</text>'
        f'<rect x="150" y="{20 * i + 12}" width="{max(0.0, min(1.0, v)) * (_W - 200):.1f}" height="14" '
        f'fill="#4a78c2"/><text x="{155 + max(0.0, min(1.0, v)) * (_W - 200):.1f}" y="{20 * i + 24}" '
        f'font-size="11">{v:.3g}</text>'
        for i, (k, v) in enumerate(kept.items())
    )
    return (
        f'<figure><svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" role="img">'
        f"{rows}</svg><figcaption>{_e(title)}</figcaption></figure>"
    )


def _frame() -> str:
    return (
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#999"/>'
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="#999"/>'
    )


def _figure(title: str, body: str, caption: str = "") -> str:
    return (
        f'<figure><svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img">'
        f'<text x="{_W / 2}" y="14" font-size="12" text-anchor="middle">{_e(title)}</text>{body}</svg>'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _empty(title: str) -> str:
    return f"<figure><figcaption>{_e(title)}: no data</figcaption></figure>"


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f'<td class="text">{_e(_fmt(r.get(c)))}</td>' for c in columns) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def metrics_table(metrics: Mapping[str, Any], comparison: Mapping[str, Any] | None) -> str:
    deltas = (comparison or {}).get("deltas", {})
    bad = {r["metric"] for r in (comparison or {}).get("regressions", [])}
    rows = "".join(
        f"<tr><td>{_e(k)}</td><td>{_e(_fmt(v))}</td><td{' class=bad' if k in bad else ''}>"
        f"{_e(_fmt(deltas.get(k)))}{' regressed' if k in bad else ''}</td></tr>"
        for k, v in metrics.items()
    )
    return f"<table><tr><th>metric</th><th>value</th><th>change vs previous run</th></tr>{rows}</table>"


def escape(value: str) -> str:
    """Text for HTML (quotes too)."""
    return _e(value)


def page(
    title: str,
    status: str,
    sections: Sequence[tuple[str, str]],
    *,
    regressed: bool | None = None,
    drifted: Sequence[str] = (),
) -> str:
    """A whole HTML document: inline CSS and SVG only, nothing fetched from anywhere. `status` is the
    verdict against the thresholds; `regressed` (against the previous run) and `drifted` beside it."""
    css_class = {"passed": "ok", "regressed": "bad", "failed": "bad", "error": "bad"}.get(status, "warn")
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    parts = "".join(f"<h2>{_e(heading)}</h2>{content}" for heading, content in sections)
    extra = ""
    if regressed is not None:
        extra += f' · Regressed: <span class="{"bad" if regressed else "ok"}">{"yes" if regressed else "no"}</span>'
    if drifted:
        extra += f' · Drift: <span class="warn">{_e(", ".join(drifted))}</span>'
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{_e(title)}</h1><p>Status: <span class="{css_class}">{_e(status)}</span>{extra}'
        f" · generated {generated}</p>"
        f"{parts}</body></html>"
    )


def write(reports_dir: Path, stem: str, document: str, summary: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write STEM.html and STEM.json under `reports_dir`; returns both paths."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    html_path = reports_dir / f"{stem}.html"
    json_path = reports_dir / f"{stem}.json"
    html_path.write_text(document, encoding="utf-8")
    json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return html_path, json_path
