"""Put retrieved passages into OpenAI-style chat messages, and build the retrieval query.

`build_rag_messages` adds one system block holding an instruction and the passages, numbered
[1], [2], ... in rank order (the same numbers `citations` returns). When the conversation
already starts with a system message the block is appended to it, so the operator's own
instructions stay first; otherwise a system message is inserted at the start. The input
messages are never modified.

`retrieval_query` uses the latest user turn. When that turn is short (fewer than
`SHORT_TURN_WORDS` words) or refers back (it contains an anaphoric word such as "it", "that",
"they", or starts with "and"/"what about"/"how about"), the previous user turns (at most
`HISTORY_TURNS`) are put before it, oldest first, because the question alone would not say
what it is about. Assistant turns are left out: they are long and mostly restate passages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from retrieval.documents import Hit

DEFAULT_INSTRUCTION = (
    "Answer the user's question using only the numbered passages below. "
    "Cite the passages you use by their number in square brackets, for example [1] or [2][3]. "
    "If the passages do not contain the answer, say that you do not know; do not use other knowledge."
)

SHORT_TURN_WORDS = 6
HISTORY_TURNS = 2
MAX_QUERY_CHARS = 2000
SNIPPET_CHARS = 240

_ANAPHORA = re.compile(
    r"\b(it|its|it's|this|that|these|those|they|them|their|theirs|he|him|his|she|her|hers|"
    r"there|then|one|ones|same|former|latter|above|else)\b",
    re.IGNORECASE,
)
_FOLLOW_UP_START = re.compile(r"^\s*(and|also|or|but|so|what about|how about|why|why not|and if)\b", re.IGNORECASE)


def message_text(content: Any) -> str:
    """Text of an OpenAI message `content`: a string or a list of parts ({"type": "text", ...})."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = [part.get("text", "") for part in content if isinstance(part, Mapping) and part.get("type") == "text"]
        return "\n".join(t for t in texts if isinstance(t, str))
    return str(content)


def needs_history(turn: str) -> bool:
    """True when a user turn is too short or too anaphoric to stand alone as a query."""
    words = re.findall(r"\w+", turn)
    return len(words) < SHORT_TURN_WORDS or bool(_ANAPHORA.search(turn) or _FOLLOW_UP_START.search(turn))


def retrieval_query(
    messages: Sequence[Mapping[str, Any]], *, history_turns: int = HISTORY_TURNS, max_chars: int = MAX_QUERY_CHARS
) -> str:
    """The text to embed for retrieval (see the module docstring for the rule); "" if no user turn."""
    user_turns = [message_text(m.get("content")).strip() for m in messages if m.get("role") == "user"]
    user_turns = [t for t in user_turns if t]
    if not user_turns:
        return ""
    latest = user_turns[-1]
    parts = [latest]
    if needs_history(latest):
        parts = [*user_turns[-1 - history_turns : -1], latest]
    query = "\n".join(parts)
    # keep the end: the latest turn matters most
    return query[-max_chars:] if len(query) > max_chars else query


def format_passages(hits: Sequence[Hit]) -> str:
    """The numbered passage list: '[n] Title' then the passage text, separated by blank lines."""
    blocks = []
    for number, hit in enumerate(hits, start=1):
        blocks.append(f"[{number}] {hit.title}\n{hit.text.strip()}")
    return "\n\n".join(blocks)


def build_rag_messages(
    messages: Sequence[Mapping[str, Any]], hits: Sequence[Hit], *, instruction: str = DEFAULT_INSTRUCTION
) -> list[dict[str, Any]]:
    """A copy of `messages` with the passages and the instruction in the system message.

    With no hits the messages come back unchanged (copied): what to do then is the
    gateway's policy (answer without passages and say so, or refuse).
    """
    out = [dict(m) for m in messages]
    if not hits:
        return out
    block = f"{instruction}\n\nPassages:\n\n{format_passages(hits)}"
    if out and out[0].get("role") == "system":
        content = out[0].get("content")
        if isinstance(content, list):
            out[0]["content"] = [*content, {"type": "text", "text": "\n\n" + block}]
        else:
            existing = message_text(content).rstrip()
            out[0]["content"] = f"{existing}\n\n{block}" if existing else block
    else:
        out.insert(0, {"role": "system", "content": block})
    return out


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    """The start of `text`, cut at a word boundary, with an ellipsis when cut."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > limit // 2 else limit].rstrip(" ,;:.") + "…"


def citations(hits: Sequence[Hit], *, snippet_chars: int = SNIPPET_CHARS) -> list[dict[str, Any]]:
    """JSON-ready citations, numbered like the prompt's markers."""
    return [
        {
            "index": number,
            "collection": hit.collection,
            "document": hit.document_id,
            "title": hit.title,
            "source": hit.source,
            "chunk_id": hit.chunk_id,
            "score": round(hit.score, 4),
            "snippet": snippet(hit.text, snippet_chars),
        }
        for number, hit in enumerate(hits, start=1)
    ]
