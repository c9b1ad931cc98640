"""How the pipeline applies the guardrails and reports their verdicts.

Which texts are checked: every client-controlled text the backend reads. The chat messages
(every role; content, text-like parts, names, tool calls: `guardrails.message_texts`), or a
completion prompt as user messages; and, as role "request", the fields outside the messages
(tool and function definitions, response_format and guided-decoding schemas, a chat_template
and its kwargs, documents, a completion's suffix). A prompt given as token ids (or embeddings)
has no text to check: it is refused while an input guard reads user text. How input
redactions go back into the request body, and how verdicts are summarised for the audit row,
the response's `gateway.guards` and the `x-gateway-*` headers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from gateway.shapes import Shape
from guardrails import InputText, Verdict, structured_text

_encode = msgspec.json.Encoder().encode
_SEVERITY = {"allow": 0, "flag": 1, "redact": 2, "block": 3}


def checked_messages(shape: Shape, body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The messages input guards look at; None when there is no text (token-id prompts)."""
    return shape.prompt_messages(body)


#: Request fields outside the messages that the backend reads as text (vLLM renders tools and
#: documents into the prompt, and guided decoding follows the schemas). Checked, never rewritten.
REQUEST_TEXT_FIELDS = (
    "tools",
    "functions",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "chat_template",
    "chat_template_kwargs",
    "documents",
    "suffix",
)


def request_texts(body: dict[str, Any]) -> list[InputText]:
    """The texts of the request's own fields (role "request"); a structure becomes one text."""
    texts = []
    for name in REQUEST_TEXT_FIELDS:
        value = body.get(name)
        if value is not None:
            texts.append(InputText(value if isinstance(value, str) else structured_text(value), "request", name))
    return texts


def blocked_param(shape: Shape, body: dict[str, Any], verdict: Verdict) -> str:
    """The request field a blocking verdict is about, for the error's `param`."""
    field = verdict.details.get("field")
    return shape.blocked_param(body, str(field) if field else None)


def last_user_text(messages: list[dict[str, Any]] | None) -> str | None:
    """The question an answer is judged against (groundedness uses it)."""
    for message in reversed(messages or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return None


def public(verdict: Verdict) -> dict[str, Any]:
    """The compact form clients see in `gateway.guards`."""
    return {
        "guard": verdict.guard,
        "stage": verdict.stage,
        "action": verdict.action,
        "allowed": verdict.allowed,
        "score": round(float(verdict.score), 4),
        "reason": verdict.reason,
        "ms": round(float(verdict.ms), 3),
    }


def worst_by_guard(verdicts: Iterable[Verdict]) -> dict[str, Verdict]:
    """One verdict per guard: the most severe one (first wins on a tie)."""
    worst: dict[str, Verdict] = {}
    for verdict in verdicts:
        current = worst.get(verdict.guard)
        if current is None or _SEVERITY.get(verdict.action, 0) > _SEVERITY.get(current.action, 0):
            worst[verdict.guard] = verdict
    return worst


def header(verdicts: Iterable[Verdict]) -> str:
    """`x-gateway-guards`: guard=action pairs, e.g. `injection=allow,toxicity=flag`."""
    return ",".join(f"{g}={v.action}" for g, v in sorted(worst_by_guard(verdicts).items()))


def audit_columns(verdicts: list[Verdict]) -> dict[str, Any]:
    """The audit row's guard columns: every verdict, who blocked, who flagged, the key scores."""
    if not verdicts:
        return {}
    # A passage guard's block drops one passage; the request itself was answered: a flag, not a block.
    blocked = next((v.guard for v in verdicts if v.action == "block" and v.stage != "passage"), None)
    flagged = sorted(
        {v.guard for v in verdicts if v.action in ("flag", "redact") or (v.action == "block" and v.stage == "passage")}
    )
    toxicity = [float(v.score) for v in verdicts if v.guard == "toxicity"]
    grounded = [float(v.score) for v in verdicts if v.guard == "groundedness"]
    return {
        "guards_json": _encode([v.to_dict() for v in verdicts]).decode(),
        "blocked_by": blocked,
        "flagged_by": ",".join(flagged) or None,
        "toxicity": max(toxicity) if toxicity else None,
        "groundedness": min(grounded) if grounded else None,
    }
