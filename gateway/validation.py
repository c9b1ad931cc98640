"""Request validation: reject what vLLM would choke on with a clear 400 naming the field.

Only the fields the gateway relies on, and the common sampling parameters, are checked; every
other field is left exactly as the client sent it and reaches the backend untouched.

Whatever the bytes, the outcome is a parsed body or an `InvalidRequest` (400), never another
exception: invalid UTF-8 and nesting deeper than `MAX_DEPTH` are rejected here, so nothing
further down (guards, the encoder that talks to the backend) meets them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.errors import InvalidRequest

_decode = msgspec.json.Decoder().decode
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_NUMBERS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p")
_INTEGERS = ("max_tokens", "max_completion_tokens", "n", "seed", "top_k", "logprobs_count", "best_of")
_BOOLS = ("stream", "echo")
MAX_DEPTH = 64  # JSON nesting; far beyond any real request, far below Python's recursion limit


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds from the settings that validation enforces."""

    max_n: int = 16  # most choices (`n`, and `best_of`) one request may ask for


DEFAULT_LIMITS = Limits()


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def decode_body(raw: bytes) -> dict[str, Any]:
    """Parse a JSON request body that must be an object."""
    if not raw.strip():
        raise InvalidRequest("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        body = _decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from exc
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid UTF-8 (byte {exc.start}).", code="invalid_json") from exc
    except RecursionError as exc:
        raise _too_deep() from exc
    if not isinstance(body, dict):
        raise InvalidRequest(f"The request body must be a JSON object, not {_type_name(body)}.", code="invalid_json")
    # Every level of nesting opens a bracket, so a body with few brackets needs no walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth_exceeds(body, MAX_DEPTH):
        raise _too_deep()
    return body


def _too_deep() -> InvalidRequest:
    return InvalidRequest(f"The request body is nested deeper than {MAX_DEPTH} levels.", code="invalid_json")


def _depth_exceeds(value: object, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` deep (iterative: no recursion to exhaust)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return False


def _check_common(body: dict[str, Any], limits: Limits) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            "you must provide a model parameter (a non-empty string)", param="model", code="missing_model"
        )
    _check_types(body)
    _check_bounds(body, limits)
    _check_stop_and_options(body)


def _check_types(body: dict[str, Any]) -> None:
    """The sampling parameters are numbers, integers and booleans where vLLM expects them."""
    for name in _NUMBERS:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise InvalidRequest(f"'{name}' must be a number, not {_type_name(value)}", param=name, code="invalid_type")
    for name in _INTEGERS:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidRequest(
                f"'{name}' must be an integer, not {_type_name(value)}", param=name, code="invalid_type"
            )
    for name in _BOOLS:
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise InvalidRequest(
                f"'{name}' must be a boolean, not {_type_name(value)}", param=name, code="invalid_type"
            )


def _check_bounds(body: dict[str, Any], limits: Limits) -> None:
    for name in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(name)
        if isinstance(value, int) and value < 1:
            raise InvalidRequest(f"'{name}' must be at least 1, got {value}", param=name, code="invalid_value")
    for name in ("n", "best_of"):
        value = body.get(name)
        if isinstance(value, int) and value > limits.max_n:
            raise InvalidRequest(
                f"'{name}' may be at most {limits.max_n} on this gateway (max_n), got {value}",
                param=name,
                code="invalid_value",
            )


def _check_stop_and_options(body: dict[str, Any]) -> None:
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise InvalidRequest("'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest("'stream_options' must be an object", param="stream_options", code="invalid_type")
        if not body.get("stream"):
            raise InvalidRequest(
                "'stream_options' is only allowed when 'stream' is true", param="stream_options", code="invalid_value"
            )


def validate_chat(body: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> None:
    """Check a `/v1/chat/completions` body in place."""
    _check_common(body, limits)
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("'messages' is a required property", param="messages", code="missing_messages")
    if not isinstance(messages, list):
        raise InvalidRequest(
            f"'messages' must be an array, not {_type_name(messages)}", param="messages", code="invalid_type"
        )
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message", param="messages", code="invalid_value")
    for i, message in enumerate(messages):
        _check_message(f"messages[{i}]", message)


def _check_message(where: str, message: object) -> None:
    """One chat message: an object with a known role and string or part-array content."""
    if not isinstance(message, dict):
        raise InvalidRequest(
            f"'{where}' must be an object, not {_type_name(message)}", param=where, code="invalid_type"
        )
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        shown = repr(role) if isinstance(role, str) else f"a {_type_name(role)}"
        raise InvalidRequest(
            f"'{where}.role' must be one of {', '.join(sorted(ROLES))}; got {shown[:100]}",
            param=f"{where}.role",
            code="invalid_role",
        )
    content = message.get("content")
    if content is None:
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            return
        raise InvalidRequest(f"'{where}.content' is required", param=f"{where}.content", code="missing_content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidRequest(
                    f"'{where}.content[{j}]' must be an object with a 'type'",
                    param=f"{where}.content[{j}]",
                    code="invalid_type",
                )
    elif not isinstance(content, str):
        raise InvalidRequest(
            f"'{where}.content' must be a string or an array of content parts, not {_type_name(content)}",
            param=f"{where}.content",
            code="invalid_type",
        )


def validate_completion(body: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> None:
    """Check a `/v1/completions` body in place."""
    _check_common(body, limits)
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest("'prompt' is a required property", param="prompt", code="missing_prompt")
    ok = (
        isinstance(prompt, str)
        or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))
        or (isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt))
        or (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt)
        )
    )
    if not ok:
        raise InvalidRequest(
            "'prompt' must be a string, an array of strings, or token ids", param="prompt", code="invalid_type"
        )


def validate_embeddings(body: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> None:
    """Check a `/v1/embeddings` body: `input` is a string or a non-empty array of strings."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            "you must provide a model parameter (a non-empty string)", param="model", code="missing_model"
        )
    data = body.get("input")
    if data is None:
        raise InvalidRequest("'input' is a required property", param="input", code="missing_input")
    if isinstance(data, str):
        texts = [data]
    elif isinstance(data, list) and data and all(isinstance(t, str) for t in data):
        texts = data
    else:
        raise InvalidRequest(
            "'input' must be a string or a non-empty array of strings (token arrays are not supported)",
            param="input",
            code="invalid_type",
        )
    if len(texts) > 2048:
        raise InvalidRequest("'input' may hold at most 2048 texts", param="input", code="invalid_value")
    if any(not t.strip() for t in texts):
        raise InvalidRequest("'input' texts must not be empty", param="input", code="invalid_value")
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be float or base64", param="encoding_format", code="invalid_value")
