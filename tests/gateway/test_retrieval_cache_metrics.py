"""/metrics reports the retrieval caches' hits and misses (issue 15)."""

from __future__ import annotations

from types import SimpleNamespace

from gateway.metrics import retrieval_cache_metrics
from retrieval.batching import LruCache


def test_cache_hits_and_misses_are_reported() -> None:
    query: LruCache[str, int] = LruCache(4)
    result: LruCache[str, int] = LruCache(4)
    query.put("q", 1)
    query.get("q"), query.get("q"), query.get("other")
    result.get("nothing")
    families = {
        f.name: f.samples[0].value
        for f in retrieval_cache_metrics(SimpleNamespace(query_cache=query, result_cache=result))
    }
    assert families["gateway_retrieval_query_embedding_cache_hits"] == 2
    assert families["gateway_retrieval_query_embedding_cache_misses"] == 1
    assert families["gateway_retrieval_query_embedding_cache_entries"] == 1
    assert families["gateway_retrieval_result_cache_misses"] == 1
