"""The audit log writer: one SQL row per request, committed in groups, never lost.

`submit(row)` queues a row and returns a future that resolves once the row is durable; the
pipeline awaits it before sending a response's final bytes. One writer task drains the queue:
everything that queued while the previous commit ran goes into the next single transaction
(group commit), so the cost of a commit is shared by every request that waits on it.

If the database refuses a batch (down, disk full) the writer retries briefly, then appends the
batch to a JSONL spool file with fsync and resolves the futures: the rows are durable there
and are replayed into SQL at the next start (or the next successful commit), skipping any
request id that already made it in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit_sinks import AuditSink, EngineSink
from gateway.db import audit_records

log = logging.getLogger("gateway.audit")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
_DATES = ("created_at", "finished_at")


class AuditWriter:
    """Group-committing writer of audit rows (dicts keyed by `audit_records` column names)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        spool_path: Path,
        sink: AuditSink | None = None,
        batch_max: int = 512,
        retries: int = 3,
        retry_delay_s: float = 0.2,
    ) -> None:
        self._engine = engine
        self._sink = sink or EngineSink(engine, audit_records)
        self._spool_path = spool_path
        self._batch_max = batch_max
        self._retries = retries
        self._retry_delay_s = retry_delay_s
        self._queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[None]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._insert = audit_records.insert()
        self.committed = 0
        self.spooled = 0
        self.batches = 0

    async def start(self) -> None:
        await self.replay_spool()
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        """Write everything still queued, then stop."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        await self._sink.close()

    def submit(self, row: dict[str, Any]) -> asyncio.Future[None]:
        """Queue a row; the future resolves when it is committed (or spooled to disk)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((row, future))
        return future

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def _run(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < self._batch_max and not queue.empty():
                batch.append(queue.get_nowait())
            rows = [row for row, _ in batch]
            try:
                await self._commit(rows)
            except Exception as exc:
                log.exception("audit batch of %d rows could not be stored", len(rows))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
            finally:
                for _ in batch:
                    queue.task_done()

    async def _commit(self, rows: list[dict[str, Any]]) -> None:
        for attempt in range(self._retries):
            try:
                await self._sink.write(rows)
                self.committed += len(rows)
                self.batches += 1
                if self.spooled and attempt == 0 and self._spool_path.exists():
                    await self.replay_spool()
                return
            except Exception:
                if attempt == self._retries - 1:
                    break
                await asyncio.sleep(self._retry_delay_s * (attempt + 1))
        log.error("database unavailable: spooling %d audit rows to %s", len(rows), self._spool_path)
        await asyncio.to_thread(self._spool, rows)
        self.spooled += len(rows)

    def _spool(self, rows: list[dict[str, Any]]) -> None:
        self._spool_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._spool_path, "ab") as spool:
            spool.write(b"".join(_encode(row) + b"\n" for row in rows))
            spool.flush()
            os.fsync(spool.fileno())

    async def replay_spool(self) -> int:
        """Insert spooled rows that are not in SQL yet; remove the spool once they are."""
        path = self._spool_path
        if not path.exists():
            return 0
        rows = []
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                row = _decode(line)
            except msgspec.DecodeError:
                log.warning("skipping a torn line in the audit spool %s", path)  # a crash mid-append
                continue
            for key in _DATES:
                if isinstance(row.get(key), str):
                    row[key] = datetime.fromisoformat(row[key])
            rows.append(row)
        ids = [row["request_id"] for row in rows]
        async with self._engine.begin() as conn:
            present: set[str] = set()
            for start in range(0, len(ids), 500):
                result = await conn.execute(
                    select(audit_records.c.request_id).where(audit_records.c.request_id.in_(ids[start : start + 500]))
                )
                present.update(result.scalars())
            missing = [row for row in rows if row["request_id"] not in present]
            if missing:
                await conn.execute(self._insert, missing)
        path.unlink()
        log.warning("replayed %d audit rows from the spool %s", len(missing), path)
        return len(missing)
