"""Reading back stored JSON text that may hold anything a client sent.

The audit log keeps request bodies as they came, including rejected ones: malformed JSON,
JSON nested thousands deep, and lone UTF-16 surrogates written as escapes (`"\\ud800"`), which
decode to Python strings that cannot be encoded as UTF-8 again. Readers (the reviewer pages,
exports, the nightly traffic eval) decode with `loads_stored`, which never raises and never
returns a string that fails to encode.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

MAX_DEPTH = 64  # deeper JSON is shown as its text: no reader needs more, and encoding it back stays safe
_SURROGATE = re.compile("[\ud800-\udfff]")
_decode = msgspec.json.Decoder().decode


class _TooDeep(Exception):
    pass


def scrub(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD, so it encodes as UTF-8."""
    if text.isascii():
        return text
    return _SURROGATE.sub("\ufffd", text)


def _clean(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list | dict):
        if depth >= MAX_DEPTH:
            raise _TooDeep
        if isinstance(value, list):
            return [_clean(v, depth + 1) for v in value]
        return {scrub(str(k)): _clean(v, depth + 1) for k, v in value.items()}
    return value


def clean(value: Any) -> Any:
    """A decoded JSON value with its strings scrubbed; None when it nests deeper than MAX_DEPTH."""
    try:
        return _clean(value, 0)
    except _TooDeep:
        return None


def loads_stored(text: str | bytes | None) -> Any:
    """Decode stored JSON text for display or re-scoring. None or empty: None. Not JSON, or
    nested deeper than MAX_DEPTH: the text itself (scrubbed). Lone surrogates become U+FFFD."""
    if text is None or text == "" or text == b"":
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        value = _decode(text)
    except (msgspec.DecodeError, RecursionError):
        try:
            value = json.loads(text)  # accepts lone surrogate escapes, which msgspec refuses
        except (ValueError, RecursionError):
            return scrub(text)
    try:
        return _clean(value, 0)
    except _TooDeep:
        return scrub(text)
