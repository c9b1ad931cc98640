"""A conversation's earlier user messages are not scored again each turn: /metrics counts the hits."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from serving.fake import FakeBackendThread
from tests.conftest import make_settings
from tests.helpers import GatewayServer


def counter(text: str, name: str) -> float:
    match = re.search(rf"^{name}(?:_total)? ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_the_second_turn_scores_only_the_new_message(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[scorers.toxicity]\nscorer = "profanity-check"\n')
    settings = make_settings(tmp_path, fake_backend.url, policy=policy, open_mode=True)
    first = [{"role": "user", "content": "What is the capital of France?"}]
    second = [*first, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"}]
    with GatewayServer(settings) as gw:
        for messages in (first, second):
            answer = httpx.post(gw.url + "/v1/chat/completions", json={"model": "fake-model", "messages": messages})
            assert answer.status_code == 200, answer.text
        metrics = httpx.get(gw.url + "/metrics").text
    # Texts scored: turn 1 the question and the answer's sentences; turn 2 the new question and
    # the answer's sentences again (the fake answers alike), and the first question from the cache.
    assert counter(metrics, "gateway_toxicity_cache_hits") >= 1
    assert counter(metrics, "gateway_toxicity_cache_misses") >= 2
