"""Input checks that can only flag run beside the backend call, not before it, and their verdicts
still reach the answer, the stream's last event and the audit row; one that may block stays first."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from guardrails.toxicity import ToxicityScorer
from serving.fake import FakeBackendThread
from tests.conftest import make_settings
from tests.helpers import GatewayServer, audit_rows

TOXIC = "You are a stupid idiot and I hate you."
POLICY = """
[scorers.toxicity]
scorer = "profanity-check"

[guards.toxicity]
action = "block"
input_action = "{input_action}"
"""


class WaitsForTheBackend(ToxicityScorer):
    """Scores like `inner`, but a text holding TOXIC first waits (up to 5 s) until the fake
    backend has received a request: only a check that runs beside the backend call sees one."""

    name = "waits-for-the-backend"

    def __init__(self, inner: ToxicityScorer, fake: FakeBackendThread) -> None:
        self.inner, self.fake = inner, fake
        self.categories = inner.categories
        self.saw_backend: list[bool] = []

    def score_batch(self, texts: Sequence[str]) -> list[dict[str, float]]:
        if any(TOXIC in t for t in texts):
            deadline = time.monotonic() + 5
            seen = False
            while not seen and time.monotonic() < deadline:
                seen = bool(httpx.get(self.fake.url + "/fake/requests").json())
                time.sleep(0.02)
            self.saw_backend.append(seen)
        return self.inner.score_batch(texts)

    def describe(self) -> dict[str, object]:
        return self.inner.describe()


def serve(
    tmp_path: Path, fake: FakeBackendThread, input_action: str
) -> Iterator[tuple[GatewayServer, WaitsForTheBackend]]:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY.format(input_action=input_action))
    settings = make_settings(tmp_path, fake.url, policy=policy, open_mode=True)
    with GatewayServer(settings) as gw:
        rails = gw.services.pipeline.rails
        assert rails is not None
        batcher = rails.resources.toxicity_batcher
        assert batcher is not None
        scorer = WaitsForTheBackend(batcher.scorer, fake)
        batcher.scorer = scorer
        yield gw, scorer


@pytest.fixture
def flagging(tmp_path: Path, fake_backend: FakeBackendThread) -> Iterator[tuple[GatewayServer, WaitsForTheBackend]]:
    yield from serve(tmp_path, fake_backend, "flag")


def input_flags(guards: list[dict]) -> list[dict]:
    return [v for v in guards if v["guard"] == "toxicity" and v["stage"] == "input"]


def test_a_flag_only_input_check_runs_beside_the_backend_call(
    flagging: tuple[GatewayServer, WaitsForTheBackend],
) -> None:
    gw, scorer = flagging
    body = {"model": "fake-model", "messages": [{"role": "user", "content": TOXIC}]}
    answer = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert scorer.saw_backend == [True]  # the backend had the request while the check ran
    flags = input_flags(answer.json()["gateway"]["guards"])
    assert [(v["action"], v["allowed"]) for v in flags] == [("flag", True)]
    assert "toxicity=flag" in answer.headers["x-gateway-guards"]
    (row,) = audit_rows(gw.settings)
    assert "toxicity" in row["flagged_by"] and input_flags(json.loads(row["guards_json"]))


def test_a_stream_carries_the_deferred_flag_in_its_last_event_and_row(
    flagging: tuple[GatewayServer, WaitsForTheBackend],
) -> None:
    gw, scorer = flagging
    body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": TOXIC}]}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30) as answer:
        events = [json.loads(line[6:]) for line in answer.iter_lines() if line.startswith("data: {")]
    assert scorer.saw_backend == [True]
    flags = input_flags(events[-1]["gateway"]["guards"])
    assert [v["action"] for v in flags] == ["flag"]
    (row,) = audit_rows(gw.settings)
    assert input_flags(json.loads(row["guards_json"])) and row["status"] == "ok"


def test_an_input_check_that_may_block_still_runs_first(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    for gw, scorer in serve(tmp_path, fake_backend, "block"):
        body = {"model": "fake-model", "messages": [{"role": "user", "content": TOXIC}]}
        answer = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "input_blocked"
        assert scorer.saw_backend == [False]  # waited the 5 s: nothing reached the backend
        assert httpx.get(fake_backend.url + "/fake/requests").json() == []
