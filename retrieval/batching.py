"""Query embeddings across concurrent requests, and bounded caches of query work.

`EmbedBatcher`: the first call while the model is idle goes straight to the executor (no
waiting); calls that arrive while a batch runs queue up and go together as the next batch. The
model executor stays the one shared executor, and one `encode` of 8 short queries costs about
what one query costs, so under load each request pays a fraction of a model call.

`LruCache`: a bounded least-recently-used map with hit and miss counts (for /metrics).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

import numpy as np

K = TypeVar("K")
V = TypeVar("V")


class EmbedBatcher:
    """Coalesces concurrent `embed` calls into one model call per batch (at most `max_texts` texts)."""

    def __init__(self, embed_sync: Callable[[list[str]], np.ndarray], executor: Executor, max_texts: int = 256) -> None:
        self._embed_sync = embed_sync
        self._executor = executor
        self.max_texts = max_texts
        self._pending: list[tuple[list[str], asyncio.Future[np.ndarray]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self.batches = 0  # model calls made
        self.calls = 0  # embed calls served

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((list(texts), future))
        self.calls += 1
        if self._drainer is None:  # idle: a batch starts now, with this call (and any that join first)
            self._drainer = loop.create_task(self._drain(loop), name="embed-batches")
        return await future  # a caller that is cancelled leaves the batch to the others

    def _take(self) -> list[tuple[list[str], asyncio.Future[np.ndarray]]]:
        taken, size = 0, 0
        for texts, _ in self._pending:
            if taken and size + len(texts) > self.max_texts:
                break
            taken, size = taken + 1, size + len(texts)
        batch, self._pending = self._pending[:taken], self._pending[taken:]
        return batch

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while self._pending:
                batch = self._take()
                texts = [text for part, _ in batch for text in part]
                self.batches += 1
                try:
                    vectors = await loop.run_in_executor(self._executor, self._embed_sync, texts)
                except Exception as exc:  # the model failed: every caller in the batch hears why
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for part, future in batch:
                    if not future.done():  # a caller that went away (cancelled) is skipped
                        future.set_result(vectors[start : start + len(part)])
                    start += len(part)
        finally:
            self._drainer = None
            for _, future in self._pending:  # only when the loop is closing: nobody waits forever
                future.cancel()
            self._pending = []


class LruCache(Generic[K, V]):
    """At most `size` entries, least recently used out first; counts hits and misses."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[K, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: K, value: V) -> None:
        if self.size <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def normalise_query(text: str) -> str:
    """The cache key of a query: whitespace collapsed (the text the model sees is otherwise kept)."""
    return " ".join(text.split())
