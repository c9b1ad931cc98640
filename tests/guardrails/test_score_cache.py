"""The toxicity batcher's score cache: a text is scored once while it stays in the cache (a chat
client resends the whole conversation every turn), and what the cache returns is what scoring gives."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from guardrails.base import GuardResources
from guardrails.toxicity import BatchingScorer, ToxicityScorer


class Counting(ToxicityScorer):
    """Scores a text by its length; remembers every batch it was asked to score."""

    name = "counting"
    categories = ("toxicity",)

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def score_batch(self, texts: Sequence[str]) -> list[dict[str, float]]:
        self.batches.append(list(texts))
        return [{"toxicity": len(t) / 100} for t in texts]

    def describe(self) -> dict[str, object]:
        return {"scorer": self.name}


def batcher(executor: ThreadPoolExecutor) -> tuple[BatchingScorer, Counting]:
    scorer = Counting()
    return BatchingScorer(scorer, GuardResources(executor=executor)), scorer


async def test_a_text_seen_before_is_not_scored_again(executor: ThreadPoolExecutor) -> None:
    cache, scorer = batcher(executor)
    first = await cache.score(["hello there", "how are you"])
    second = await cache.score(["how are you", "a new turn of the conversation"])
    assert scorer.batches == [["hello there", "how are you"], ["a new turn of the conversation"]]
    assert first == [{"toxicity": 0.11}, {"toxicity": 0.11}]
    assert second == [{"toxicity": 0.11}, {"toxicity": 0.30}]
    assert (cache.cache_hits, cache.cache_misses) == (1, 3)
    assert await cache.score(["hello there", "how are you"]) == first and len(scorer.batches) == 2


async def test_the_cache_is_bounded_and_keeps_no_long_text(executor: ThreadPoolExecutor) -> None:
    cache, scorer = batcher(executor)
    cache.cache_size = 2
    await cache.score(["one", "two", "three"])  # "one" is pushed out
    await cache.score(["three", "one"])
    assert scorer.batches[-1] == ["one"]
    long_text = "x" * 5000
    await cache.score([long_text])
    await cache.score([long_text])
    assert scorer.batches[-2:] == [[long_text], [long_text]]


async def test_a_caller_changing_its_scores_does_not_change_the_cache(executor: ThreadPoolExecutor) -> None:
    cache, _ = batcher(executor)
    (scores,) = await cache.score(["some text"])
    scores["toxicity"] = 1.0
    assert await cache.score(["some text"]) == [{"toxicity": 0.09}]
