"""Property-based fuzzing of the gateway: hostile request bodies, and a backend that answers anything.

Whatever comes in, from the client or from the backend: never a 5xx other than 502/503/504,
errors in OpenAI's format, a stream that always ends with `[DONE]`, and exactly one audit row
per request. Deterministic (`derandomize=True`, no example database) and bounded, so CI runs
the same examples every time; one gateway and one fake backend serve the module.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from gateway.settings import Settings
from gateway.shapes import CHAT, TEXT, event_problem, well_formed_event
from serving.fake import FakeBackendThread, FakeConfig
from tests.conftest import make_settings
from tests.helpers import GatewayServer, audit_rows, create_key

FUZZ = hypothesis_settings(
    max_examples=100,  # per fuzzer: about 10 s each on a busy 2-core machine
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ALLOWED_5XX = {502, 503, 504}


@dataclass
class Target:
    settings: Settings
    client: httpx.Client
    request_ids: list[str] = field(default_factory=list)

    def send(self, path: str, content: bytes, *, complete: bool = True) -> None:
        """One request; checks what the client sees, and notes the request id for the audit check.

        `complete=False`: the backend's answer is known to be cut short, so a 200 stream must
        carry an error event, never pass for a finished answer."""
        with self.client.stream("POST", path, content=content) as resp:
            raw = resp.read()
        status = resp.status_code
        assert status < 500 or status in ALLOWED_5XX, raw[:500]
        self.request_ids.append(resp.headers["x-gateway-request-id"])
        if status != 200:
            error = json.loads(raw)["error"]
            assert set(error) >= {"message", "type", "param", "code"} and error["message"]
            return
        if resp.headers["content-type"].startswith("text/event-stream"):
            payloads = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
            assert payloads[-1] == "[DONE]", raw[-500:]
            decoded = [json.loads(payload) for payload in payloads[:-1]]
            assert all(isinstance(event, dict) for event in decoded)
            if not complete:
                assert "error" in decoded[-1], raw[-500:]
        else:
            assert isinstance(json.loads(raw), dict)

    def assert_one_row_each(self) -> None:
        counts = Counter(r["request_id"] for r in audit_rows(self.settings))
        assert self.request_ids and {counts[i] for i in self.request_ids} == {1}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with FakeBackendThread(FakeConfig(models=("fake-model",), answer_tokens=6)) as fake:
        settings = make_settings(tmp_path_factory.mktemp("fuzz"), fake.url, max_answer_bytes=64 * 1024)
        _, key = create_key(settings)
        with (
            GatewayServer(settings) as gateway,
            httpx.Client(base_url=gateway.url, headers={"authorization": f"Bearer {key}"}, timeout=30) as client,
        ):
            yield Target(settings, client)


# --- strategies -----------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)  # fmt: skip
roles = st.sampled_from(["user", "system", "assistant", "tool", "wizard", ""]) | json_values
text_parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}))
content = st.text(max_size=40) | json_values | text_parts
messages = st.lists(
    st.fixed_dictionaries({}, optional={"role": roles, "content": content, "name": json_values}) | json_values,
    max_size=3,
)
chat_bodies = st.fixed_dictionaries(
    {"model": st.just("fake-model") | json_values},
    optional={
        "messages": messages | json_values,
        "stream": st.booleans() | json_values,
        "n": st.integers(-2, 40) | json_values,
        "best_of": st.integers(-2, 40),
        "max_tokens": st.integers(-2, 8) | json_values,
        "temperature": st.floats(0, 2) | json_values,
        "stop": st.text(max_size=5) | json_values,
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
        "rag": json_values,
        "vendor": json_values,
    },
)
completion_bodies = st.fixed_dictionaries(
    {"model": st.just("fake-model") | json_values},
    optional={"prompt": st.text(max_size=40) | json_values, "stream": st.booleans(), "n": st.integers(-2, 40)},
)
raw_bodies = st.binary(max_size=200) | st.builds(lambda n: b"[" * n, st.integers(1, 5000))


def _encoded(value: Any) -> bytes:
    return json.dumps(value).encode()


request_bodies = (
    chat_bodies.map(lambda b: ("/v1/chat/completions", _encoded(b)))
    | completion_bodies.map(lambda b: ("/v1/completions", _encoded(b)))
    | raw_bodies.map(lambda b: ("/v1/chat/completions", b))
)

finish_reasons = st.none() | st.sampled_from(["stop", "length"]) | json_values
chat_choice = st.fixed_dictionaries(
    {},
    optional={
        "index": st.integers(-1, 3) | json_values,
        "message": st.none() | json_values | st.fixed_dictionaries({"role": st.just("assistant")},
                                                                    optional={"content": content}),
        "delta": st.none() | json_values | st.fixed_dictionaries({}, optional={"content": content}),
        "finish_reason": finish_reasons,
    },
)  # fmt: skip
counts = {"prompt_tokens": st.integers() | json_values, "completion_tokens": st.integers(), "total_tokens": scalars}
usage = st.none() | json_values | st.fixed_dictionaries({}, optional=counts)
answers = json_values | st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=8),
        "object": st.sampled_from(["chat.completion", "chat.completion.chunk"]),
        "choices": st.lists(chat_choice | json_values, max_size=3) | json_values,
        "usage": usage,
    },
)
# Mostly well-formed events with hostile leaves, some anything at all, some not JSON.
stream_event = st.fixed_dictionaries(
    {"choices": st.lists(chat_choice, min_size=1, max_size=2)}, optional={"usage": usage}
)
events = st.lists(st.one_of(stream_event, stream_event, answers, st.text(max_size=30)), max_size=6)


# --- the fuzzers ----------------------------------------------------------------------------


def test_fuzz_request_bodies(target: Target) -> None:
    @FUZZ
    @given(request=request_bodies)
    def one(request: tuple[str, bytes]) -> None:
        path, body = request
        target.send(path, body)

    one()
    target.assert_one_row_each()


def test_fuzz_backend_answers(target: Target) -> None:
    @FUZZ
    @given(answer=answers)
    def one(answer: Any) -> None:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "fake": {"body": answer}}
        target.send("/v1/chat/completions", _encoded(body))

    one()
    target.assert_one_row_each()


def test_fuzz_backend_streams(target: Target) -> None:
    @FUZZ
    @given(stream=events, done=st.booleans(), include_usage=st.booleans())
    def one(stream: list[Any], done: bool, include_usage: bool) -> None:
        body = {
            "model": "fake-model",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": include_usage},
            "fake": {"events": stream, "done": done},
        }
        target.send("/v1/chat/completions", _encoded(body), complete=done)

    one()
    target.assert_one_row_each()


@FUZZ
@given(event=st.one_of(stream_event, answers), chat=st.booleans())
def test_fast_event_check_agrees_with_the_explaining_one(event: Any, chat: bool) -> None:
    # The relay runs the one-call check on every event, and the explaining one only to word the error.
    shape = CHAT if chat else TEXT
    assert well_formed_event(shape, event) is (event_problem(shape, event) is None)
