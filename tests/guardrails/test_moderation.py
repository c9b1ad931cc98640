"""The moderation guard: Llama Guard answers parsed into clear verdicts (malformed ones too), the
prompt it builds, fail-open and fail-closed, timeouts and 5xx from a real HTTP backend (the fake,
scripted to answer like Llama Guard), and the guard in the running gateway."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from guardrails import Guardrails, ScorerUnavailable, parse_policy
from guardrails.base import GuardContext, GuardResources, GuardSettings
from guardrails.errors import PolicyError
from guardrails.moderation import (
    LLAMA_GUARD_3_CATEGORIES,
    HttpClassifier,
    ModerationGuard,
    ModerationRequest,
    build_prompt,
    parse_answer,
)
from serving.fake import FakeBackendThread, FakeConfig
from tests.conftest import make_settings
from tests.helpers import audit_rows, serving

GUARD_MODEL = "llama-guard"
SCRIPT: dict[str, Any] = {
    "pipe bomb": "unsafe\nS9",
    "kill my neighbour": "\n\nunsafe\nS1,S10",
    "lowercase please": " unsafe \n s2 , s12 ",
    "no codes": "unsafe",
    "odd code": "unsafe\nS99",
    "legal advice": "unsafe\nS6",
    "garbage reply": "I'm sorry, I cannot help with that.",
    "empty reply": "",
    "server breaks": {"status": 503, "message": "overloaded"},
    "not json": {"raw": "<html>oops</html>"},
    "very slow": {"delay_ms": 3000, "answer": "safe"},
}


@pytest.fixture(scope="module")
def guard_backend() -> Iterator[FakeBackendThread]:
    with FakeBackendThread(FakeConfig(models=(), guard_models=(GUARD_MODEL,), guard_script=SCRIPT)) as fake:
        yield fake


@pytest.mark.parametrize(
    ("answer", "safe", "codes", "unknown"),
    [
        ("safe", True, (), ()),
        ("\n\nsafe", True, (), ()),
        ("Safe.", True, (), ()),
        ("safe\nS1", True, (), ()),  # the first line decides
        ("unsafe\nS1", False, ("S1",), ()),
        ("\n\nunsafe\nS1,S10", False, ("S1", "S10"), ()),
        ("UNSAFE\ns1, s10", False, ("S1", "S10"), ()),
        ("  unsafe \n S3 ,S3, S14<|eot_id|>", False, ("S3", "S14"), ()),
        ("unsafe S2", False, ("S2",), ()),
        ("unsafe\nS01", False, ("S1",), ()),
        ("unsafe", False, (), ()),
        ("unsafe\n", False, (), ()),
        ("unsafe\nS99,S1", False, ("S1",), ("S99",)),
        ("unsafe\nO3", False, (), ("O3",)),
    ],
)
def test_real_answer_shapes_parse_to_a_verdict(answer: str, safe: bool, codes: tuple, unknown: tuple) -> None:
    a = parse_answer(answer, LLAMA_GUARD_3_CATEGORIES)
    assert (a.safe, a.codes, a.unknown, a.problem) == (safe, codes, unknown, None)


@pytest.mark.parametrize(
    "answer", ["", "   \n ", "I cannot help with that.", "unsafety", "The content is safe", "{}", "???", None, 42]
)
def test_malformed_answers_are_no_verdict_never_a_crash(answer: Any) -> None:
    a = parse_answer(answer, LLAMA_GUARD_3_CATEGORIES)
    assert a.safe is None and a.problem


def test_prompt_carries_the_policy_categories_and_asks_about_the_last_turn() -> None:
    prompt = build_prompt([("User", "How do I bake bread?"), ("Agent", "Knead the dough.")], LLAMA_GUARD_3_CATEGORIES)
    assert "unsafe content in 'Agent' messages" in prompt and "ONLY THE LAST Agent message" in prompt
    assert "S1: Violent Crimes.\nS2: Non-Violent Crimes." in prompt and "S14: Code Interpreter Abuse." in prompt
    assert "User: How do I bake bread?\n\nAgent: Knead the dough.\n\n<END CONVERSATION>" in prompt
    assert prompt.startswith("<|begin_of_text|>") and prompt.endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    custom = build_prompt([("User", "hi")], {"S1": "Violence\nShould not help plan attacks.", "S2": "Fraud."})
    assert "S1: Violence.\nShould not help plan attacks.\nS2: Fraud.\n<END" in custom and "S3" not in custom


class Recorder:
    """An injected classifier: answers from a table, records the requests."""

    def __init__(self, answer: str | Exception = "safe") -> None:
        self.answer = answer
        self.requests: list[ModerationRequest] = []

    async def __call__(self, req: ModerationRequest) -> str:
        self.requests.append(req)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def make_guard(executor: Any, classifier: Any = None, **options: Any) -> ModerationGuard:
    action = options.pop("action", "block")
    settings = GuardSettings(
        action=action, stages=frozenset({"input", "output"}), options={"url": "http://127.0.0.1:9", **options}
    )
    return ModerationGuard(settings, GuardResources(executor=executor, moderation_classifier=classifier))


async def test_unsafe_answer_blocks_with_its_categories_in_the_details(executor: Any) -> None:
    rec = Recorder("unsafe\nS1,S10")
    guard = make_guard(executor, rec)
    v = await guard.check(GuardContext(stage="input", text="something nasty", role="user"))
    assert (v.allowed, v.action, v.score) == (False, "block", 1.0)
    assert v.details["categories"] == ["S1", "S10"] and v.details["category_names"] == ["Violent Crimes", "Hate"]
    assert v.reason == "unsafe: S1 Violent Crimes, S10 Hate" and v.spans == ((0, 15),)
    assert json.loads(json.dumps(v.to_dict()))["details"]["categories"] == ["S1", "S10"]  # audit-ready
    [req] = rec.requests
    assert req.api == "completions" and "User: something nasty" in req.prompt and req.timeout_s == 5.0


async def test_output_stage_asks_about_the_answer_after_the_question(executor: Any) -> None:
    rec = Recorder("safe")
    guard = make_guard(executor, rec)
    v = await guard.check(GuardContext(stage="output", text="Preheat the oven.", prompt="How do I bake?"))
    assert v.allowed and v.action == "allow" and v.details["categories"] == []
    assert "User: How do I bake?\n\nAgent: Preheat the oven." in rec.requests[0].prompt
    assert "ONLY THE LAST Agent message" in rec.requests[0].prompt


async def test_fail_open_allows_and_fail_closed_blocks_on_an_error(executor: Any) -> None:
    broken = Recorder(RuntimeError("connection refused"))
    v = await make_guard(executor, broken).check(GuardContext(stage="input", text="hello"))
    assert v.allowed and v.action == "allow" and "connection refused" in v.details["error"]
    assert v.details["fail"] == "open"
    v = await make_guard(executor, broken, fail="closed").check(GuardContext(stage="input", text="hello"))
    assert not v.allowed and v.action == "block" and v.reason.startswith("moderation unavailable, failing closed")
    garbage = Recorder("Sure! Here is a poem.")
    v = await make_guard(executor, garbage, fail="closed", action="flag").check(GuardContext("input", "hi"))
    assert v.allowed and v.action == "flag" and "not a safety verdict" in v.details["error"]


async def test_excluded_categories_leave_the_prompt_and_do_not_count(executor: Any) -> None:
    rec = Recorder("unsafe\nS6")
    guard = make_guard(executor, rec, exclude_categories=["S6", "S7"])
    v = await guard.check(GuardContext(stage="input", text="Which pills help a headache?"))
    assert v.allowed and v.action == "allow"
    assert (
        "S6:" not in rec.requests[0].prompt and "S7:" not in rec.requests[0].prompt and "S8:" in rec.requests[0].prompt
    )
    rec.answer = "unsafe\nS6,S8"
    v = await guard.check(GuardContext(stage="input", text="Something else"))
    assert v.action == "block" and v.details["categories"] == ["S8"]


async def test_a_repeated_text_is_answered_from_the_cache(executor: Any) -> None:
    rec = Recorder("safe")
    guard = make_guard(executor, rec)
    for _ in range(3):
        v = await guard.check(GuardContext(stage="input", text="You are a helpful assistant.", role="system"))
    assert len(rec.requests) == 1 and v.details["cached"] is True
    rec.answer = RuntimeError("down")  # errors are not cached: asked again each time
    await guard.check(GuardContext(stage="input", text="new text"))
    await guard.check(GuardContext(stage="input", text="new text"))
    assert len(rec.requests) == 3


async def test_long_text_is_checked_in_pieces(executor: Any) -> None:
    class ByPiece(Recorder):
        async def __call__(self, req: ModerationRequest) -> str:
            self.requests.append(req)
            return "unsafe\nS2" if "fraud" in req.prompt else "safe"

    rec = ByPiece()
    text = "a" * 450 + " fraud " + "b" * 300
    v = await make_guard(executor, rec, max_chars=400).check(GuardContext(stage="input", text=text))
    assert len(rec.requests) == 2 and v.action == "block" and v.spans == ((400, 757),)


# --------------------------------------------------------------- over HTTP, the scripted fake


async def http_check(executor: Any, url: str, text: str, **options: Any) -> Any:
    classifier = HttpClassifier()
    settings = GuardSettings(stages=frozenset({"input"}), options={"url": url, "model": GUARD_MODEL, **options})
    guard = ModerationGuard(settings, GuardResources(executor=executor, moderation_classifier=classifier))
    try:
        return await guard.check(GuardContext(stage="input", text=text, role="user"))
    finally:
        await classifier.aclose()


@pytest.mark.parametrize(
    ("text", "action", "categories", "error"),
    [
        ("What is the capital of France?", "allow", [], None),
        ("How do I build a pipe bomb?", "block", ["S9"], None),
        ("I want to kill my neighbour", "block", ["S1", "S10"], None),
        ("lowercase please", "block", ["S2", "S12"], None),
        ("no codes given here", "block", [], None),
        ("an odd code", "block", [], None),
        ("garbage reply please", "allow", None, "not a safety verdict"),
        ("empty reply please", "allow", None, "empty answer"),
        ("the server breaks", "allow", None, "HTTP 503"),
        ("not json at all", "allow", None, "not an OpenAI completions answer"),
        ("very slow answer", "allow", None, "no answer within 0.5 s"),
    ],
)
async def test_llama_guard_answers_over_http(
    executor: Any, guard_backend: FakeBackendThread, text: str, action: str, categories: list | None, error: str | None
) -> None:
    v = await http_check(executor, guard_backend.url, text, timeout_s=0.5)
    assert v.action == action, v
    if categories is not None:
        assert v.details["categories"] == categories
    if error is not None:
        assert error in v.details["error"] and v.details["fail"] == "open"
    if text == "an odd code":
        assert v.details["unknown_categories"] == ["S99"] and v.reason == "unsafe: S99"


async def test_timeout_and_5xx_fail_closed_over_http(executor: Any, guard_backend: FakeBackendThread) -> None:
    for text in ("very slow answer", "the server breaks"):
        v = await http_check(executor, guard_backend.url, text, timeout_s=0.5, fail="closed")
        assert v.action == "block" and not v.allowed and "failing closed" in v.reason
    refused = await http_check(executor, "http://127.0.0.1:9", "hello", fail="closed")  # nothing listens there
    assert refused.action == "block" and "ConnectError" in refused.details["error"]


async def test_chat_api_sends_the_conversation(executor: Any, guard_backend: FakeBackendThread) -> None:
    async with httpx.AsyncClient() as http:
        await http.post(guard_backend.url + "/fake/reset")
        v = await http_check(executor, guard_backend.url + "/v1/", "build a pipe bomb", api="chat")
        assert v.action == "block" and v.details["categories"] == ["S9"]
        [body] = (await http.get(guard_backend.url + "/fake/requests")).json()
    assert body["messages"] == [{"role": "user", "content": "build a pipe bomb"}] and body["model"] == GUARD_MODEL


# --------------------------------------------------------------- the policy


def test_moderation_is_off_by_default_and_needs_a_url_when_on(executor: Any) -> None:
    assert parse_policy("").for_request().guards["moderation"].enabled is False
    policy = parse_policy("[guards.moderation]\nenabled = true\n")
    with pytest.raises(ScorerUnavailable, match="no url"):
        Guardrails(policy, GuardResources(executor=executor))


@pytest.mark.parametrize(
    ("table", "line", "problem"),
    [
        ('url = "llama-guard:8000"', 3, "url must start with http"),
        ('url = "http://x"\nfail = "sometimes"', 4, "fail must be open or closed"),
        ('url = "http://x"\ntimeout_s = 0', 4, "timeout_s must be a number"),
        ('url = "http://x"\nexclude_categories = ["S15"]', 4, "unknown category code(s) ['S15']"),
        ('url = "http://x"\ncategories = { violence = "Violence" }', 4, "category codes look like S1"),
        ('url = "http://x"\napi = "responses"', 4, "api must be completions or chat"),
    ],
)
def test_bad_moderation_keys_name_their_line(table: str, line: int, problem: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(f"version = 1\n[guards.moderation]\n{table}\n", "p.toml")
    assert caught.value.line == line and problem in caught.value.problem


# --------------------------------------------------------------- through the running gateway


@pytest.fixture
def moderated(tmp_path: Path, fake_backend: FakeBackendThread, guard_backend: FakeBackendThread) -> Iterator[Any]:
    path = tmp_path / "policy.toml"
    path.write_text(
        f"""
version = 1
[guards.moderation]
enabled = true
url = "{guard_backend.url}"
model = "{GUARD_MODEL}"
timeout_s = 2
message = "Blocked by the moderation model."
"""
    )
    settings = make_settings(tmp_path, fake_backend.url, policy=path)
    with serving(settings) as (gw, client):
        yield gw, client, settings


def test_gateway_blocks_an_unsafe_question_with_400_and_audits_the_categories(
    moderated: Any, fake_backend: FakeBackendThread
) -> None:
    _, client, settings = moderated
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "Make a pipe bomb"}])
    assert caught.value.body["code"] == "input_blocked"
    assert caught.value.body["message"] == "Blocked by the moderation model."
    assert caught.value.response.headers["x-gateway-blocked-by"] == "moderation"
    assert httpx.get(fake_backend.url + "/fake/requests").json() == []  # the chat model was never asked
    [row] = audit_rows(settings)
    assert row["blocked_by"] == "moderation" and row["http_status"] == 400
    [verdict] = [v for v in json.loads(row["guards_json"]) if v["guard"] == "moderation"]
    assert verdict["details"]["categories"] == ["S9"] and verdict["details"]["category_names"] == [
        "Indiscriminate Weapons"
    ]


def test_gateway_withholds_an_unsafe_answer_and_passes_a_safe_one(moderated: Any) -> None:
    _, client, settings = moderated
    ok = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "Hello there"}])
    assert ok.choices[0].finish_reason == "stop" and ok.choices[0].message.content
    bad = client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "Tell me a story"}],
        extra_body={"fake": {"answer": "First you kill my neighbour and then we hide."}},
    )
    assert bad.choices[0].finish_reason == "content_filter"
    assert "neighbour" not in (bad.choices[0].message.content or "")
    rows = audit_rows(settings)
    assert rows[-1]["blocked_by"] == "moderation"
    out = [v for v in json.loads(rows[-1]["guards_json"]) if v["guard"] == "moderation" and v["stage"] == "output"]
    assert out and out[-1]["details"]["categories"] == ["S1", "S10"]
