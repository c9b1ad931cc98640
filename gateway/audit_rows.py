"""Fitting audit rows to the audit table, so that what a client or a backend sends never makes a row unstorable.

`RowShape.fit` runs on every row (a few microseconds): it keeps only the table's columns, turns
values into the column's type (an object where text belongs becomes its JSON, a count that is
not a 32-bit integer becomes NULL), replaces NUL characters (PostgreSQL refuses them in text)
and cuts strings to their column's length with a visible marker. `RowShape.scrub` is the slow,
thorough pass (lone surrogates, time zones) for the rare row a database still refuses, and
`RowShape.stub` keeps only what identifies the request, for a row that is refused even then.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import BigInteger, Boolean, DateTime, Float, Integer, String, Table

TRUNCATED = "…[truncated]"
NUL_REPLACEMENT = "\ufffd"  # as undecodable bytes already are: the text shows where something was dropped
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_encode = msgspec.json.Encoder().encode


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict | list | tuple):
        try:
            return _encode(value).decode()
        except (TypeError, ValueError):
            return repr(value)
    return str(value)


def _integer(value: Any, low: int, high: int) -> int | None:
    """A whole number in range, or None: a token count that is anything else is not a count."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    elif isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            return None
    if type(value) is int and low <= value <= high:
        return value
    return None


def _real(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _moment(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):  # a spooled row: msgspec wrote ISO 8601
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def _no_surrogates(text: str) -> str:
    """Replace lone UTF-16 surrogates (from a backend's JSON escapes), which no UTF-8 database accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


class RowShape:
    """What the audit table accepts, derived once from its `Table`."""

    def __init__(self, table: Table) -> None:
        # (name, kind, limit): kind is str, int, float, bool or datetime; limit a length or an int range
        plan: list[tuple[str, type, Any]] = []
        self.required: dict[str, Callable[[dict[str, Any]], Any]] = {}
        for column in table.columns:
            if column.primary_key and column.autoincrement is True:
                continue  # the database numbers rows
            kind_of = column.type
            if isinstance(kind_of, String):  # Text is a String without a length
                plan.append((column.name, str, kind_of.length))
            elif isinstance(kind_of, Integer):
                plan.append((column.name, int, _INT64 if isinstance(kind_of, BigInteger) else _INT32))
            elif isinstance(kind_of, Float):
                plan.append((column.name, float, None))
            elif isinstance(kind_of, Boolean):
                plan.append((column.name, bool, None))
            elif isinstance(kind_of, DateTime):
                plan.append((column.name, datetime, None))
            else:  # pragma: no cover - a new column type needs a rule here
                raise TypeError(f"no audit rule for column {column.name} of type {kind_of!r}")
            if not column.nullable:
                self.required[column.name] = _default_for(column.name, plan[-1][1])
        self._plan = tuple(plan)
        self.columns = tuple(name for name, _, _ in plan)

    def fit(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row as the table takes it: every column present, each value of the column's type."""
        out: dict[str, Any] = {}
        for name, kind, limit in self._plan:
            value = row.get(name)
            out[name] = None if value is None else _FITTERS[kind](value, limit)
        for name, default in self.required.items():
            if out[name] is None:
                out[name] = default(out)
        return out

    def scrub(self, row: dict[str, Any]) -> dict[str, Any]:
        """The thorough pass for a row a database refused after `fit`: every string, every time zone."""
        out = self.fit(row)
        for name, kind, _ in self._plan:
            value = out[name]
            if kind is str and value is not None:
                out[name] = _no_surrogates(value)
            elif kind is datetime and value is not None and value.tzinfo is None:
                out[name] = value.replace(tzinfo=UTC)
        return out

    def stub(self, row: dict[str, Any], reason: str) -> dict[str, Any]:
        """Only what identifies the request and its outcome; for a row refused even after `scrub`."""
        keep = ("api_key_id", "client_ip", "http_status", "status", "stream", "created_at", "finished_at")
        stub = {name: row.get(name) for name in keep}
        stub["request_id"] = row.get("request_id")
        stub["endpoint"] = row.get("endpoint")
        stub["error_code"] = "audit_row_refused"
        stub["error_message"] = reason
        return self.scrub(stub)


def _fit_text(value: Any, limit: Any) -> str:
    if type(value) is not str:
        value = _text(value)
    if "\x00" in value:
        value = value.replace("\x00", NUL_REPLACEMENT)
    if limit is not None and len(value) > limit:
        value = value[: max(limit - len(TRUNCATED), 0)] + TRUNCATED[:limit]
    return str(value)


def _fit_integer(value: Any, limit: Any) -> int | None:
    if type(value) is not int or not limit[0] <= value <= limit[1]:
        return _integer(value, *limit)
    return int(value)


def _fit_real(value: Any, _limit: Any) -> float | None:
    return value if type(value) is float else _real(value)


def _fit_flag(value: Any, _limit: Any) -> bool:
    return value if type(value) is bool else (value is True or value in (1, "true", "1"))


def _fit_moment(value: Any, _limit: Any) -> datetime | None:
    return value if isinstance(value, datetime) else _moment(value)


# One fitter per column kind, called for every value that is not None (about 0.1 us each).
_FITTERS: dict[type, Callable[[Any, Any], Any]] = {
    str: _fit_text,
    int: _fit_integer,
    float: _fit_real,
    bool: _fit_flag,
    datetime: _fit_moment,
}


def _default_for(name: str, kind: type) -> Callable[[dict[str, Any]], Any]:
    """What a required column holds when a row lacks it (a row must still be stored)."""
    if name == "request_id":
        return lambda _row: uuid.uuid4().hex
    if name == "finished_at":
        return lambda row: row.get("created_at") or datetime.now(UTC)
    if kind is datetime:
        return lambda _row: datetime.now(UTC)
    if kind is bool:
        return lambda _row: False
    if kind is int:
        return lambda _row: 0
    if kind is float:
        return lambda _row: 0.0
    return lambda _row: "unknown"
