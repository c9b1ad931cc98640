from __future__ import annotations

from retrieval.documents import Hit
from retrieval.prompt import build_rag_messages, citations, needs_history, retrieval_query, snippet

HITS = [
    Hit(
        "kb",
        "warranty.md",
        "warranty.md#0",
        "Warranty",
        "docs/warranty.md",
        "Every robot has a 2-year warranty.",
        0.81234,
        1,
    ),
    Hit(
        "kb",
        "returns.html",
        "returns.html#2",
        "Returns",
        "docs/returns.html",
        "Returns are accepted within 30 days. " * 20,
        0.5,
        2,
    ),
]


def test_passages_are_numbered_in_a_new_system_message() -> None:
    messages = [{"role": "user", "content": "How long is the warranty?"}]
    out = build_rag_messages(messages, HITS)
    assert [m["role"] for m in out] == ["system", "user"]
    system = out[0]["content"]
    assert "[1] Warranty\nEvery robot has a 2-year warranty." in system
    assert "[2] Returns\nReturns are accepted" in system
    assert system.index("[1]") < system.index("[2]")
    assert "only the numbered passages" in system and "cite" in system.lower()
    assert out[1] == messages[0]
    assert messages == [{"role": "user", "content": "How long is the warranty?"}]  # input untouched


def test_existing_system_message_is_kept_first() -> None:
    messages = [{"role": "system", "content": "You are Kestrel's assistant."}, {"role": "user", "content": "warranty?"}]
    out = build_rag_messages(messages, HITS[:1])
    assert len(out) == 2
    assert out[0]["content"].startswith("You are Kestrel's assistant.\n\n")
    assert "[1] Warranty" in out[0]["content"]
    assert messages[0]["content"] == "You are Kestrel's assistant."


def test_system_message_with_content_parts() -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "warranty?"},
    ]
    out = build_rag_messages(messages, HITS[:1])
    parts = out[0]["content"]
    assert parts[0] == {"type": "text", "text": "Be brief."}
    assert "[1] Warranty" in parts[1]["text"]


def test_no_hits_leaves_messages_alone() -> None:
    messages = [{"role": "user", "content": "hi"}]
    out = build_rag_messages(messages, [])
    assert out == messages and out[0] is not messages[0]


def test_query_is_the_latest_user_turn_when_it_stands_alone() -> None:
    messages = [
        {"role": "user", "content": "How long is the warranty on the vacuum?"},
        {"role": "assistant", "content": "Two years."},
        {"role": "user", "content": "Which countries does Kestrel ship orders to?"},
    ]
    assert retrieval_query(messages) == "Which countries does Kestrel ship orders to?"


def test_short_or_anaphoric_turns_pull_in_history() -> None:
    history = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Tell me about the Mowbot M3 lawn mower."},
        {"role": "assistant", "content": "It is a robotic mower that ..."},
    ]
    short = [*history, {"role": "user", "content": "How much?"}]
    assert retrieval_query(short) == "Tell me about the Mowbot M3 lawn mower.\nHow much?"
    anaphoric = [*history, {"role": "user", "content": "Does it work when the weather is rainy outside?"}]
    assert retrieval_query(anaphoric).startswith("Tell me about the Mowbot M3")
    parts = [
        *history,
        {
            "role": "user",
            "content": [{"type": "text", "text": "And the price"}, {"type": "image_url", "image_url": {"url": "x"}}],
        },
    ]
    assert retrieval_query(parts).endswith("\nAnd the price")
    assert "robotic mower that" not in retrieval_query(short)  # assistant turns are left out


def test_history_is_bounded() -> None:
    messages = [{"role": "user", "content": f"question number {i} about topic {i}"} for i in range(6)]
    messages.append({"role": "user", "content": "why?"})
    query = retrieval_query(messages)
    assert query == "question number 4 about topic 4\nquestion number 5 about topic 5\nwhy?"
    assert retrieval_query([{"role": "assistant", "content": "hello"}]) == ""
    long = [{"role": "user", "content": "x" * 5000}]
    assert len(retrieval_query(long)) == 2000


def test_needs_history_rule() -> None:
    assert needs_history("How much?")
    assert needs_history("What about the returns policy for opened items?")
    assert needs_history("Can you tell me whether that applies to mowers too?")
    assert not needs_history("How long is the warranty on the KR-200 vacuum?")


def test_citations_match_the_markers() -> None:
    cites = citations(HITS)
    assert [c["index"] for c in cites] == [1, 2]
    assert cites[0] == {
        "index": 1,
        "collection": "kb",
        "document": "warranty.md",
        "title": "Warranty",
        "source": "docs/warranty.md",
        "chunk_id": "warranty.md#0",
        "score": 0.8123,
        "snippet": "Every robot has a 2-year warranty.",
    }
    assert cites[1]["snippet"].endswith("…") and len(cites[1]["snippet"]) <= 241
    assert snippet("a b c", 100) == "a b c"
