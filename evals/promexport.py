"""Eval results as Prometheus metrics: `gateway eval run/traffic --prom-textfile FILE` writes the
run's headline figures in the text format node_exporter's textfile collector reads (written to a
temporary file and renamed, so the collector never sees half a file); `--pushgateway URL` PUTs the
same to a Pushgateway (job `gateway_eval`, grouped by kind and run name).

Every number in the run's summary metrics becomes `gateway_eval_<metric>{kind, name}` (accuracy,
block/flag rates, guard precision and recall, drift PSI, latency...); with them
`gateway_eval_exit_code`, `gateway_eval_regressed`, `gateway_eval_passed` (only for runs with
thresholds: 1 met, 0 not) and `gateway_eval_last_run_timestamp_seconds`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

_NAME = re.compile(r"[^a-zA-Z0-9_]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prom-textfile", type=Path, default=None, metavar="FILE.prom",
        help="write the run's figures as Prometheus metrics (textfile-collector format) to FILE.prom",
    )  # fmt: skip
    parser.add_argument(
        "--pushgateway", default=None, metavar="URL", help="push the run's figures to this Prometheus Pushgateway"
    )


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flat name -> number of the summary's metrics (nested dicts joined with _; lists, text skipped)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = _NAME.sub("_", f"{prefix}{key}").strip("_").lower()
        if isinstance(value, dict):
            out.update(_numbers(value, name + "_"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def render(summary: dict[str, Any], now: float | None = None) -> str:
    """The run's figures in the Prometheus text exposition format."""
    labels = f'kind="{_label(str(summary.get("kind", "")))}",name="{_label(str(summary.get("name", "")))}"'
    lines: list[str] = []

    def metric(name: str, value: float, help_text: str) -> None:
        lines.append(f"# HELP gateway_eval_{name} {help_text}")
        lines.append(f"# TYPE gateway_eval_{name} gauge")
        lines.append(f"gateway_eval_{name}{{{labels}}} {value!r}")

    for name, value in sorted(_numbers(summary.get("metrics") or {}).items()):
        metric(name, value, f"{name} of the latest eval run")
    status = str(summary.get("status", ""))
    metric("exit_code", float(summary.get("exit_code", 2)), "0 passed, 1 failed, 2 could not run, 3 regressed, 4 drift")
    if status in ("passed", "failed"):
        metric("passed", 1.0 if status == "passed" else 0.0, "1 when the run met its thresholds, 0 when it did not")
    metric("regressed", 1.0 if summary.get("regressed") else 0.0, "1 when the run got worse than the previous one")
    metric("last_run_timestamp_seconds", float(now if now is not None else time.time()), "when the run ended")
    return "\n".join(lines) + "\n"


def write_textfile(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def push(url: str, summary: dict[str, Any], text: str) -> None:
    import httpx

    target = (
        f"{url.rstrip('/')}/metrics/job/gateway_eval/kind/{quote(str(summary.get('kind', '')), safe='')}"
        f"/name/{quote(str(summary.get('name', '')) or 'unnamed', safe='')}"
    )
    httpx.put(target, content=text.encode(), headers={"content-type": "text/plain"}, timeout=10).raise_for_status()


def export(summary: dict[str, Any], args: argparse.Namespace) -> int:
    """Write/push as asked; 0, or 1 (after a message on stderr) when it could not."""
    path, url = getattr(args, "prom_textfile", None), getattr(args, "pushgateway", None)
    if path is None and url is None:
        return 0
    text = render(summary)
    try:
        if path is not None:
            write_textfile(path, text)
        if url is not None:
            push(url, summary, text)
    except Exception as exc:
        print(f"gateway eval: could not export metrics ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    return 0
