"""One background pass that `gateway serve` repeats: rollups, partitions ahead, the text index.

A subclass says what one pass does (`run_once`), how often (`INTERVAL_S`), on which databases
(`DIALECTS`) and what to tell the operator when a pass fails (`FAILED`). A failed pass is logged
and retried after the interval (the database may be away for a while); a pass that returns False
ends the task (nothing to keep on this database). `stop` cancels it and waits.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from typing import ClassVar

from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("gateway")


class PeriodicTask(abc.ABC):
    """`run_once` every `interval_s` seconds in a task of its own, from `start` to `stop`."""

    NAME: ClassVar[str]  # the task's name, and the start of its log lines
    INTERVAL_S: ClassVar[float]
    DIALECTS: ClassVar[frozenset[str] | None] = None  # the databases it runs on; None: all
    FAILED: ClassVar[str] = "the next pass tries again"  # after "NAME: pass failed (why); "

    def __init__(self, engine: AsyncEngine, interval_s: float | None = None) -> None:
        self.engine = engine
        self.interval_s = self.INTERVAL_S if interval_s is None else interval_s
        self._task: asyncio.Task[None] | None = None

    @abc.abstractmethod
    async def run_once(self) -> bool:
        """One pass; False when there is nothing to do on this database, ever (the task ends)."""

    def start(self) -> None:
        if self.DIALECTS is None or self.engine.dialect.name in self.DIALECTS:
            self._task = asyncio.create_task(self._run(), name=self.NAME)

    async def _run(self) -> None:
        while True:
            try:
                if not await self.run_once():
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: pass failed (%s); %s", self.NAME, exc, self.FAILED)
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
