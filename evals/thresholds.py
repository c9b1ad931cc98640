"""Thresholds: what a run must reach to pass, and the verdict against them.

A run's `status` says whether it met its thresholds (`passed` / `failed`), or that it had none to
meet (`unchecked`); whether it got worse than the previous run is a separate field, `regressed`.

Thresholds come from the eval set's header line (`{"thresholds": {...}}`), from flags
(`--threshold METRIC=VALUE`, `METRIC>=VALUE`, `METRIC<=VALUE`, and `--min-pass-rate X` for
`pass_rate>=X`; a flag replaces the header's threshold on the same metric and side) and, for eval
sets that name none at all, from `DEFAULT_DATASET_THRESHOLDS` (pass_rate >= 0.8): an eval set
whose items mostly fail must not read "passed". Traffic runs have no default (re-scored traffic
has no right answer to reach): without thresholds their status is `unchecked`.

`METRIC=VALUE` takes the metric's good direction (a rate that should be high gets `>=`, a latency
or error rate `<=`); a metric without one (block_rate, flag_rate) must say `>=` or `<=`. A
threshold whose metric the run could not measure (no references, so no correctness) is not met:
a check that cannot be made is no pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from evals import metrics

Op = Literal[">=", "<="]
DEFAULT_MIN_PASS_RATE = 0.8

#: Good direction of the metrics a bare `METRIC=VALUE` may name: +1 higher is better (`>=`), -1 lower (`<=`).
DIRECTIONS: dict[str, int] = {
    **metrics.RATE_METRICS,  # the rates a run is compared on (eval sets)
    "items": 1,
    "errors": -1,
    "latency_mean_ms": -1,
    "latency_p50_ms": -1,
    "latency_p95_ms": -1,
    "latency_p99_ms": -1,
    # traffic
    "requests": 1,
    "changed_outcomes": -1,
    "changed_rate": -1,
    "rescore_errors": -1,
    "ratings": 1,
    "rated_requests": 1,
    "rating_positive_rate": 1,
    "rating_neutral_rate": -1,
    "rating_negative_rate": -1,
    "rating_mean": 1,
}
#: Metrics that exist but have no good direction: a threshold on them must give its side.
UNDIRECTED = frozenset({"blocked_rate", "block_rate", "flag_rate", "labelled", "requests_previous"})
_PATTERNS = re.compile(r"^(ratings_)?[a-z_]+_(precision|recall)$")  # per guard, against labels or ratings
_FLAG = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|=)\s*(\S+)\s*$")


class ThresholdError(ValueError):
    """A threshold that cannot be used: the message names it and says what is wrong."""


@dataclass(frozen=True, slots=True)
class Threshold:
    metric: str
    op: Op
    value: float
    source: str  # "flag", "dataset header" or "default"

    def describe(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"

    def check(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        actual = metrics.get(self.metric)
        value: float | None = None
        if isinstance(actual, int | float) and not isinstance(actual, bool) and math.isfinite(actual):
            value = float(actual)
        measured = value is not None
        ok = value is not None and (value >= self.value if self.op == ">=" else value <= self.value)
        out: dict[str, Any] = {
            "metric": self.metric,
            "op": self.op,
            "value": self.value,
            "actual": actual if measured else None,
            "ok": bool(ok),
            "source": self.source,
        }
        if not measured:
            out["note"] = "not measured in this run"
        return out


def direction(metric: str) -> int | None:
    if metric in DIRECTIONS:
        return DIRECTIONS[metric]
    if _PATTERNS.match(metric):
        return 1
    return None


def known(metric: str) -> bool:
    return metric in DIRECTIONS or metric in UNDIRECTED or bool(_PATTERNS.match(metric))


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ThresholdError(f"{where}: the threshold must be a finite number, not {value!r}")
    return float(value)


def _bare(metric: str, value: float, source: str, where: str) -> Threshold:
    good = direction(metric)
    if good is None:
        raise ThresholdError(
            f"{where}: {metric!r} has no better direction: write {metric}>=VALUE or {metric}<=VALUE"
            if metric in UNDIRECTED
            else f"{where}: unknown metric {metric!r} (known: {', '.join(sorted(DIRECTIONS))}, "
            "GUARD_precision, GUARD_recall, ratings_GUARD_precision, ratings_GUARD_recall)"
        )
    return Threshold(metric, ">=" if good > 0 else "<=", value, source)


def parse_flag(text: str) -> Threshold:
    """`METRIC=VALUE` (the metric's good direction), `METRIC>=VALUE` or `METRIC<=VALUE`."""
    match = _FLAG.match(text)
    where = f"--threshold {text!r}"
    if not match:
        raise ThresholdError(f"{where}: write METRIC=VALUE, METRIC>=VALUE or METRIC<=VALUE (e.g. pass_rate=0.8)")
    metric, op, raw = match.groups()
    try:
        number = float(raw)
    except ValueError as exc:
        raise ThresholdError(f"{where}: {raw!r} is not a number") from exc
    value = _number(number, where)
    if not known(metric):
        _bare(metric, value, "flag", where)  # raises, naming the known metrics
    if op == "=":
        return _bare(metric, value, "flag", where)
    return Threshold(metric, ">=" if op == ">=" else "<=", value, "flag")


def from_header(raw: Any, where: str) -> list[Threshold]:
    """`{"pass_rate": 0.8, "latency_p95_ms": {"max": 3000}, "blocked_rate": {"min": 0.05, "max": 0.3}}`."""
    if not isinstance(raw, Mapping):
        raise ThresholdError(f"{where}: 'thresholds' must be an object of metric: value")
    out: list[Threshold] = []
    for metric, spec in raw.items():
        at = f"{where}: thresholds.{metric}"
        if not isinstance(metric, str) or not known(metric):
            _bare(str(metric), 0.0, "dataset header", at)  # raises, naming the known metrics
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"min", "max"}
            if unknown or not spec:
                raise ThresholdError(f'{at}: use a number, or {{"min": X}} and/or {{"max": Y}}')
            if "min" in spec:
                out.append(Threshold(metric, ">=", _number(spec["min"], at), "dataset header"))
            if "max" in spec:
                out.append(Threshold(metric, "<=", _number(spec["max"], at), "dataset header"))
        else:
            out.append(_bare(metric, _number(spec, at), "dataset header", at))
    return out


def combine(
    header: Sequence[Threshold], flags: Sequence[Threshold], default: Sequence[Threshold] = ()
) -> list[Threshold]:
    """Header thresholds, replaced by flags on the same metric and side; `default` only when both are empty."""
    if not header and not flags:
        return list(default)
    chosen = {(t.metric, t.op): t for t in header}
    chosen.update({(t.metric, t.op): t for t in flags})
    return list(chosen.values())


DEFAULT_DATASET_THRESHOLDS = (Threshold("pass_rate", ">=", DEFAULT_MIN_PASS_RATE, "default"),)


@dataclass(frozen=True, slots=True)
class Verdict:
    status: Literal["passed", "failed", "unchecked"]
    checks: list[dict[str, Any]]
    reason: str


def verdict(thresholds: Iterable[Threshold], metrics: Mapping[str, Any]) -> Verdict:
    """`passed` when every threshold is met, `failed` when one is not, `unchecked` when there are none."""
    checks = [t.check(metrics) for t in thresholds]
    if not checks:
        return Verdict("unchecked", [], "no thresholds: nothing was checked (give --threshold METRIC=VALUE)")
    missed = [c for c in checks if not c["ok"]]
    default = " (default threshold: the set names none)" if all(c["source"] == "default" for c in checks) else ""
    if missed:
        parts = [
            f"{c['metric']} {_fmt(c['actual'])} is not {c['op']} {c['value']:g}"
            + (f" ({c['note']})" if "note" in c else "")
            for c in missed
        ]
        return Verdict("failed", checks, "; ".join(parts) + default)
    met = ", ".join(f"{c['metric']} {_fmt(c['actual'])} {c['op']} {c['value']:g}" for c in checks)
    return Verdict("passed", checks, f"met: {met}{default}")


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
