"""The pipeline's per-request caches are bounded by configuration, never by what clients send."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from gateway.auth import KeyInfo
from gateway.pipeline import Pipeline
from guardrails import Guardrails
from guardrails.policy import parse_policy

POLICY = """
[guards.toxicity]
enabled = false

[guards.groundedness]
enabled = false

[overrides.model.checked-model.guards.toxicity]
enabled = true
"""


async def test_ten_thousand_model_names_leave_the_guard_cache_bounded() -> None:
    with ThreadPoolExecutor(1) as executor:
        rails = await Guardrails.load(parse_policy(POLICY), executor, toxicity_scorer=object())  # type: ignore[arg-type]
        pipeline = Pipeline(backend=None, audit=None, keys=None, rails=rails)  # type: ignore[arg-type]
        key = KeyInfo(id="k1", name="k1", role="user")
        for i in range(10_000):
            assert pipeline.output_guarded(key, f"model-{i}") is False
        assert pipeline.output_guarded(key, "checked-model") is True
        assert pipeline.output_guarded(key, None) is False
        assert len(pipeline._active) <= 2  # (no override, output) and (checked-model, output)
