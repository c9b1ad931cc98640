"""The audit log writer: one SQL row per request, committed in groups, never lost.

`submit(row)` queues a row and returns a future that resolves once the row is durable; the
pipeline awaits it before sending a response's final bytes. One writer task drains the queue:
everything that queued while the previous commit ran goes into the next single transaction
(group commit), so the cost of a commit is shared by every request that waits on it.

Every row is first fitted to the table (`RowShape.fit`: types, NUL characters, column lengths),
so what a client or backend sends cannot make it unstorable. A failed commit is then one of two
things (`is_refusal`):

- the database is unreachable (down, locked, refusing connections): the writer retries for at
  most `db_wait_s`, then appends the batch to a JSONL spool file with fsync and resolves the
  futures. Until a commit succeeds again, a batch tries the database once at most every
  `probe_interval_s` and otherwise goes straight to the spool. After the next
  successful commit a background task replays the spool into SQL (also at start-up), in chunks,
  skipping request ids already there, so the live path never waits for it;
- the database refused some rows (bad data): the batch is split in halves until the good rows
  are committed; a refused row is scrubbed and tried again, and if it is still refused its
  identifying columns are stored alone and the full row goes to a dead-letter JSONL file, with
  the database's error, in the log and in the file. A refused row never reaches the spool, so
  it cannot block the replay or the next start.

Replicas may share one data volume: each writes its own spool (and dead-letter file) under
`DATA_DIR/spool/`, named after its host, pid and a random part, and holds an exclusive `flock` on
a lock file of that name while it runs (`ReplicaSpool`). At start-up a replica takes over the
spool of every replica whose lock it can take (one that died, or stopped with rows unstored):
it moves those rows into its own spool and replays them. A live replica's lock is held, so two
replicas never take the same file; a running replica looks again every `adopt_interval_s`, so
the rows of a replica scaled away while the database was down do not wait for the next start.
The single `DATA_DIR/audit-spool.jsonl` of older versions is taken over the same way (locked on
itself).

Failed authentications without a key go through `FailedAuthAllowance`: per client address, the
first few a minute are written in full and the rest are counted into one summary row, so a
flood of junk cannot fill the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit_rows import RowShape
from gateway.audit_sinks import AuditSink, EngineSink, is_refusal
from gateway.db import audit_records

log = logging.getLogger("gateway.audit")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
_REPLAY_CHUNK = 500
_REPLAY_BACKOFF_S = 5.0  # after a replay that could not finish, the next one waits this long


class AuditWriter:
    """Group-committing writer of audit rows (dicts keyed by `audit_records` column names)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        spool_path: Path | None = None,
        replica_spool: ReplicaSpool | None = None,
        sink: AuditSink | None = None,
        batch_max: int = 512,
        retries: int = 3,
        retry_delay_s: float = 0.2,
        db_wait_s: float = 2.0,
        probe_interval_s: float = 0.25,
        dead_letter_path: Path | None = None,
        failed_auth: FailedAuthAllowance | None = None,
        adopt_interval_s: float = 60.0,
    ) -> None:
        self._engine = engine
        self._sink = sink or EngineSink(engine, audit_records)
        # One of the two: a spool file of this writer alone, or this replica's files in a shared folder.
        self._replica_spool = replica_spool
        self._adopt_interval_s = adopt_interval_s
        self._adopt_task: asyncio.Task[None] | None = None
        if replica_spool is not None:
            spool_path = replica_spool.spool_path
            dead_letter_path = dead_letter_path or replica_spool.dead_letter_path
        if spool_path is None:
            raise ValueError("AuditWriter needs a spool_path or a replica_spool")
        self._spool_path = spool_path
        self._replaying_path = spool_path.with_name(spool_path.name + ".replaying")
        self.dead_letter_path = dead_letter_path or spool_path.with_name("audit-dead-letter.jsonl")
        self._batch_max = batch_max
        self._retries = max(retries, 1)
        self._retry_delay_s = retry_delay_s
        self._db_wait_s = db_wait_s
        self._probe_interval_s = probe_interval_s
        self._shape = RowShape(audit_records)
        self._failed_auth = failed_auth if failed_auth is not None else FailedAuthAllowance()
        self._queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[None]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._tally_task: asyncio.Task[None] | None = None
        self._replay_task: asyncio.Task[int] | None = None
        self._spool_lock = threading.Lock()  # the spool file is appended and taken in worker threads
        self._spool_waiting = False  # rows wait in the spool for the next replay
        self._next_replay_at = 0.0
        self._down = False  # the last commit found the database unreachable: one try per batch
        self._next_try = 0.0  # while down, batches before this time go straight to the spool
        self._spooled_while_down = 0
        self.committed = 0
        self.spooled = 0
        self.batches = 0
        self.refused = 0  # rows the database refused as they were (stored scrubbed, or as a stub)
        self.dead_lettered = 0
        self.failed_auth_suppressed = 0

    async def start(self) -> None:
        """Start writing; rows left in the spool by an earlier run are replayed in the background
        (with a replica spool: also those of every replica that is gone)."""
        if self._replica_spool is not None:
            await asyncio.to_thread(self._replica_spool.claim)
            await self.adopt_orphans()
        if self._spool_path.exists() or self._replaying_path.exists():
            self._spool_waiting = True
            self._schedule_replay()
        self._task = asyncio.create_task(self._run(), name="audit-writer")
        self._tally_task = asyncio.create_task(self._flush_tallies(), name="audit-failed-auth")
        if self._replica_spool is not None:
            self._adopt_task = asyncio.create_task(self._adopt_periodically(), name="audit-adopt")

    async def stop(self) -> None:
        """Write everything still queued (and the failed-authentication summaries), then stop."""
        if self._task is None:
            return
        if self._adopt_task is not None:
            self._adopt_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._adopt_task
            self._adopt_task = None
        if self._tally_task is not None:
            self._tally_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tally_task
            self._tally_task = None
        for summary in self._failed_auth.drain():
            self._queue.put_nowait((summary, asyncio.get_running_loop().create_future()))
        await self._queue.join()
        if self._replay_task is not None:
            with contextlib.suppress(Exception):
                await self._replay_task
        if self._spool_waiting:  # one last try, bounded: what it cannot store waits for the next start
            self._next_try = 0.0
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.replay_spool(), timeout=3 * max(self._db_wait_s, 1.0))
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        await self._sink.close()
        if self._replica_spool is not None:  # rows still spooled stay, for the next replica to start
            await asyncio.to_thread(self._replica_spool.release)

    def submit(self, row: dict[str, Any]) -> asyncio.Future[None]:
        """Queue a row; the future resolves when it is committed (or spooled to disk)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if row.get("status") == "unauthorized" and row.get("api_key_id") is None:
            admitted, summaries = self._failed_auth.admit(row)
            for summary in summaries:
                self._queue.put_nowait((summary, asyncio.get_running_loop().create_future()))
            if not admitted:
                self.failed_auth_suppressed += 1
                future.set_result(None)  # counted in its address's summary row
                return future
        self._queue.put_nowait((row, future))
        return future

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    @property
    def spool_path(self) -> Path:
        """This writer's spool file (it may not exist: nothing waits)."""
        return self._spool_path

    def spool_bytes(self) -> int:
        """Bytes of this writer's spool waiting for replay (what is being replayed included)."""
        return sum(_size(path) for path in (self._spool_path, self._replaying_path))

    async def _run(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < self._batch_max and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                rows = [self._shape.fit(row) for row, _ in batch]
                await self._store(rows)
            except Exception as exc:  # the spool itself failed (disk full): the requests must know
                log.exception("audit batch of %d rows could not be stored", len(batch))
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
            if self._spool_waiting and not self._down:
                self._schedule_replay()

    async def _store(self, rows: list[dict[str, Any]]) -> None:
        """Commit fitted rows; spool those the database could not take because it is unreachable."""
        unreachable = await self._commit(rows)
        if unreachable:
            await self._spool(unreachable)

    async def _spool(self, rows: list[dict[str, Any]]) -> None:
        if not self._spooled_while_down:
            log.error("audit database unavailable: spooling audit rows to %s until it is back", self._spool_path)
        await asyncio.to_thread(self._append, self._spool_path, rows, None)
        self.spooled += len(rows)
        self._spooled_while_down += len(rows)

    async def _commit(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store rows; returns those left unstored because the database is unreachable.

        Refused rows are split out (`_split`), so one bad row never costs the others their commit."""
        if not rows:
            return []
        started = time.monotonic()
        if self._down and started < self._next_try:
            return rows  # the database was just found down: do not make this batch wait on it again
        attempt = 0
        while True:
            try:
                await self._sink.write(rows)
            except Exception as exc:
                if is_refusal(exc):
                    refusal = exc
                    break
                attempt += 1
                if self._down or attempt >= self._retries or time.monotonic() - started >= self._db_wait_s:
                    if not self._down:
                        log.error("audit database unreachable: %s", _one_line(exc))
                    self._down = True
                    self._next_try = time.monotonic() + self._probe_interval_s
                    return rows
                await asyncio.sleep(self._retry_delay_s * attempt)
            else:
                self.committed += len(rows)
                self.batches += 1
                if self._down:
                    self._down = False
                    log.warning("audit database reachable again; %d rows were spooled", self._spooled_while_down)
                    self._spooled_while_down = 0
                return []
        return await self._split(rows, refusal)

    async def _split(self, rows: list[dict[str, Any]], error: Exception) -> list[dict[str, Any]]:
        if len(rows) == 1:
            return await self._refused(rows[0], error)
        middle = len(rows) // 2
        left = await self._commit(rows[:middle])
        if left:  # unreachable now: keep the rest for the spool too
            return left + rows[middle:]
        return await self._commit(rows[middle:])

    async def _refused(self, row: dict[str, Any], error: Exception) -> list[dict[str, Any]]:
        """One row the database refused: store it scrubbed, else its stub, and dead-letter the full row."""
        self.refused += 1
        request_id = row.get("request_id")
        try:
            await self._sink.write([self._shape.scrub(row)])
        except Exception as again:
            if not is_refusal(again):
                return [row]
            error = again
        else:
            self.committed += 1
            log.warning(
                "audit row %s stored after scrubbing; the database refused it: %s", request_id, _one_line(error)
            )
            return []
        # A commit whose acknowledgement was lost, then retried, is refused as a duplicate: it is stored.
        try:
            if await self._present([str(request_id)]):
                self.committed += 1
                return []
        except Exception:
            return [row]  # cannot tell now: spool it, the replay decides
        reason = f"the database refused this audit row: {_one_line(error)}"[:2000]
        log.error("audit row %s set aside: %s; the full row is in %s", request_id, reason, self.dead_letter_path)
        await asyncio.to_thread(self._append, self.dead_letter_path, [row], reason)
        self.dead_lettered += 1
        try:
            await self._sink.write(
                [self._shape.stub(row, f"{reason}; the full row is in {self.dead_letter_path.name}")]
            )
        except Exception as stub_error:
            if not is_refusal(stub_error):
                return [self._shape.stub(row, reason)]
            log.error("even the stub of audit row %s was refused: %s", request_id, _one_line(stub_error))
        else:
            self.committed += 1
        return []

    async def _present(self, ids: list[str]) -> set[str]:
        async with self._engine.connect() as conn:
            result = await conn.execute(select(audit_records.c.request_id).where(audit_records.c.request_id.in_(ids)))
            return set(result.scalars())

    def _append(self, path: Path, rows: list[dict[str, Any]], reason: str | None) -> None:
        """Append rows as JSON lines with fsync (a dead letter carries its reason and time)."""
        lines = b"".join(self._line(row, reason) + b"\n" for row in rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._spool_lock, open(path, "ab") as out:
            out.write(lines)
            out.flush()
            os.fsync(out.fileno())
            if path == self._spool_path:
                self._spool_waiting = True

    async def adopt_orphans(self) -> int:
        """Take over the spools of replicas that are gone and replay them; returns how many were taken."""
        if self._replica_spool is None:
            return 0
        before = len(self._replica_spool.adopted)
        taken = await asyncio.to_thread(self._replica_spool.adopt, self._append_spooled)
        if taken:
            names = ", ".join(path.name for path in self._replica_spool.adopted[before:]) or "empty files"
            log.warning("took over the audit spool of %d replica(s) that are gone: %s", taken, names)
            if self._task is not None and not self._down:
                self._schedule_replay()
        return taken

    async def _adopt_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._adopt_interval_s)
            try:
                await self.adopt_orphans()
            except Exception:  # a shared volume that hiccups must not stop the writer
                log.exception("looking for the audit spools of gone replicas failed")

    def _append_spooled(self, data: bytes) -> None:
        """Append whole spool lines taken over from another replica's spool (with fsync)."""
        if not data.strip():
            return
        self._spool_path.parent.mkdir(parents=True, exist_ok=True)
        with self._spool_lock, open(self._spool_path, "ab") as out:
            out.write(data if data.endswith(b"\n") else data + b"\n")
            out.flush()
            os.fsync(out.fileno())
            self._spool_waiting = True

    def _line(self, row: dict[str, Any], reason: str | None) -> bytes:
        for attempt in (row, None):
            value = attempt if attempt is not None else self._shape.scrub(row)  # lone surrogates do not encode
            try:
                if reason is None:
                    return _encode(value)
                return _encode({"failed_at": datetime.now(UTC), "error": reason, "row": value})
            except (TypeError, ValueError):
                if attempt is None:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _schedule_replay(self) -> None:
        if self._replay_task is not None and not self._replay_task.done():
            return
        if time.monotonic() < self._next_replay_at:
            return
        self._replay_task = asyncio.create_task(self.replay_spool(), name="audit-replay")

    def _take_spool(self) -> bytes:
        """Move the spool aside (new spooled rows start a new file) and read what waits for replay."""
        with self._spool_lock:
            self._spool_waiting = False
            if self._spool_path.exists():
                data = self._spool_path.read_bytes()
                with open(self._replaying_path, "ab") as replaying:
                    replaying.write(data if data.endswith(b"\n") or not data else data + b"\n")
                    replaying.flush()
                    os.fsync(replaying.fileno())
                self._spool_path.unlink()
            return self._replaying_path.read_bytes() if self._replaying_path.exists() else b""

    async def replay_spool(self) -> int:
        """Insert spooled rows that are not in SQL yet; returns how many were stored.

        Never raises for the database: rows it cannot take now (unreachable) go back to the
        spool for a later replay, and refused rows are set aside like live ones."""
        data = await asyncio.to_thread(self._take_spool)
        rows: dict[str, dict[str, Any]] = {}
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                raw = _decode(line)
            except msgspec.DecodeError:
                log.warning("skipping a torn line in the audit spool %s", self._spool_path)  # a crash mid-append
                continue
            if isinstance(raw, dict):
                row = self._shape.fit(raw)
                rows.setdefault(row["request_id"], row)
        pending = list(rows.values())
        stored = 0
        left: list[dict[str, Any]] = []
        for start in range(0, len(pending), _REPLAY_CHUNK):
            chunk = pending[start : start + _REPLAY_CHUNK]
            try:
                present = await self._present([row["request_id"] for row in chunk])
            except Exception as exc:
                log.warning("audit spool replay paused, the database is unreachable: %s", _one_line(exc))
                left = pending[start:]
                break
            missing = [row for row in chunk if row["request_id"] not in present]
            unstored = await self._commit(missing)
            stored += len(missing) - len(unstored)
            if unstored:
                left = unstored + pending[start + _REPLAY_CHUNK :]
                break
        if left:
            await asyncio.to_thread(self._append, self._spool_path, left, None)
            self._next_replay_at = time.monotonic() + _REPLAY_BACKOFF_S
        with self._spool_lock:
            self._replaying_path.unlink(missing_ok=True)
        if stored or left:
            log.warning(
                "replayed %d audit rows from the spool %s%s",
                stored,
                self._spool_path,
                f"; {len(left)} wait for the database" if left else "",
            )
        return stored

    async def _flush_tallies(self) -> None:
        """Write the summaries of failed-authentication windows that have ended."""
        while True:
            await asyncio.sleep(self._failed_auth.window_s)
            for summary in self._failed_auth.due():
                self._queue.put_nowait((summary, asyncio.get_running_loop().create_future()))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def replica_id() -> str:
    """A name for this process that no other replica shares: host (the pod's name), pid, random part."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"
    return f"{host}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


class ReplicaSpool:
    """One replica's spool and dead-letter files in a folder that several replicas share.

    While it runs, the replica holds `flock(LOCK_EX)` on `audit-spool.<replica>.lock`; the lock
    goes when the process does, however it ends. `adopt` takes over the files of every other
    replica whose lock it can take without waiting, and of the old single spool file `legacy`.
    (`flock` works across machines on NFSv4, where Linux maps it onto byte-range locks.)
    """

    PREFIX = "audit-spool."
    _SUFFIXES = (".jsonl.replaying", ".jsonl", ".lock")

    def __init__(self, directory: Path, *, replica: str | None = None, legacy: Sequence[Path] = ()) -> None:
        self.directory = directory
        self.replica = replica or replica_id()
        self.spool_path = directory / f"{self.PREFIX}{self.replica}.jsonl"
        self.dead_letter_path = directory / f"audit-dead-letter.{self.replica}.jsonl"
        self.lock_path = directory / f"{self.PREFIX}{self.replica}.lock"
        self.legacy = tuple(legacy)  # spool files of versions before per-replica spools
        self.adopted: list[Path] = []  # spool files taken over from other replicas
        self._lock_fd: int | None = None

    def claim(self) -> None:
        """Take this replica's lock (held until `release` or the process ends)."""
        if self._lock_fd is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RuntimeError(f"the audit spool lock {self.lock_path} is held by another process") from None
        self._lock_fd = fd

    def others(self) -> list[str]:
        """Replicas other than this one that left files in the folder."""
        names = set()
        for path in self.directory.glob(f"{self.PREFIX}*"):
            stem = path.name[len(self.PREFIX) :]
            for suffix in self._SUFFIXES:
                if stem.endswith(suffix):
                    names.add(stem[: -len(suffix)])
                    break
        names.discard(self.replica)
        return sorted(names)

    def adopt(self, append: Callable[[bytes], None]) -> int:
        """Hand the spooled lines of every replica that holds no lock to `append` (into this
        replica's spool, durably), then delete its files; returns how many spools were taken."""
        taken = 0
        for other in self.others():
            spool = self.directory / f"{self.PREFIX}{other}.jsonl"
            files = [spool, spool.with_name(spool.name + ".replaying")]
            if self._take(self.directory / f"{self.PREFIX}{other}.lock", files, append, create=True):
                taken += 1
        for spool in self.legacy:
            files = [spool, spool.with_name(spool.name + ".replaying")]
            lock = next((f for f in files if f.exists()), None)
            if lock is not None and self._take(lock, files, append, create=False):
                taken += 1
        return taken

    def _take(self, lock: Path, files: list[Path], append: Callable[[bytes], None], *, create: bool) -> bool:
        try:
            fd = os.open(lock, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            return False  # another replica took it a moment ago
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # its replica is alive (or another one is taking it over right now)
            try:
                if os.stat(lock).st_ino != os.fstat(fd).st_ino:
                    return False  # taken over and deleted while we waited for the lock
            except FileNotFoundError:
                return False
            for path in files:
                with contextlib.suppress(FileNotFoundError):
                    data = path.read_bytes()
                    append(data)  # durable in our spool before the file goes
                    if data.strip():
                        self.adopted.append(path)
            for path in [*files, lock]:
                path.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)

    def release(self) -> None:
        """Stop holding the lock; with nothing left in this replica's spool, its files go too."""
        if self._lock_fd is None:
            return
        spooled = [p for p in (self.spool_path, self.spool_path.with_name(self.spool_path.name + ".replaying"))
                   if _size(p)]  # fmt: skip
        if not spooled:
            for path in (self.spool_path, self.spool_path.with_name(self.spool_path.name + ".replaying")):
                path.unlink(missing_ok=True)
            self.lock_path.unlink(missing_ok=True)  # still ours: deleted before the lock is let go
        os.close(self._lock_fd)
        self._lock_fd = None


def _one_line(error: BaseException) -> str:
    """The driver's message without SQLAlchemy's SQL and parameters (which may hold the prompt)."""
    text = str(getattr(error, "orig", None) or error)
    return text.split("\n", 1)[0][:500]


@dataclass(slots=True)
class _Tally:
    started: float
    written: int = 0
    counted: int = 0
    first: Any = None
    last: Any = None
    endpoints: Counter[str] = field(default_factory=Counter)


class FailedAuthAllowance:
    """Per client address and window, the first `allowance` rows of failed authentication (no key)
    are written in full; the rest become one summary row per address and window.

    At most `max_addresses` addresses are tracked; beyond that, newcomers share one tally (its
    summary row has no client address), so memory stays bounded under a flood of addresses."""

    OVERFLOW = "*"

    def __init__(
        self,
        allowance: int = 10,
        window_s: float = 60.0,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allowance = allowance
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._clock = clock
        self._tallies: dict[str | None, _Tally] = {}

    def admit(self, row: dict[str, Any]) -> tuple[bool, list[dict[str, Any]]]:
        """Whether to write this row in full, and summary rows of windows that ended meanwhile."""
        now = self._clock()
        address = row.get("client_ip")
        summaries: list[dict[str, Any]] = []
        tally = self._tallies.get(address)
        if tally is not None and now - tally.started >= self.window_s:
            summaries.extend(self._close(address, tally))
            tally = None
        if tally is None:
            if len(self._tallies) >= self.max_addresses:
                summaries.extend(self.due())
            if len(self._tallies) >= self.max_addresses:
                address = self.OVERFLOW
                tally = self._tallies.get(address)
            if tally is None:
                tally = self._tallies[address] = _Tally(now)
        if tally.written < self.allowance:
            tally.written += 1
            return True, summaries
        tally.counted += 1
        tally.first = tally.first or row.get("created_at")
        tally.last = row.get("finished_at") or row.get("created_at")
        tally.endpoints[str(row.get("endpoint"))] += 1
        return False, summaries

    def due(self) -> list[dict[str, Any]]:
        """Summaries of the windows that have ended; their addresses are forgotten."""
        now = self._clock()
        ended = [(a, t) for a, t in self._tallies.items() if now - t.started >= self.window_s]
        return [summary for address, tally in ended for summary in self._close(address, tally)]

    def drain(self) -> list[dict[str, Any]]:
        """Summaries of every open window (at shutdown)."""
        return [summary for address, tally in list(self._tallies.items()) for summary in self._close(address, tally)]

    def _close(self, address: str | None, tally: _Tally) -> list[dict[str, Any]]:
        del self._tallies[address]
        if not tally.counted:
            return []
        shared = address == self.OVERFLOW
        source = "addresses beyond the tracked limit" if shared else (address or "an unknown address")
        endpoint = tally.endpoints.most_common(1)[0][0]
        now = datetime.now(UTC)
        return [
            {
                "request_id": uuid.uuid4().hex,
                "created_at": tally.first or now,
                "finished_at": tally.last or now,
                "api_key_id": None,
                "endpoint": endpoint,
                "stream": False,
                "status": "unauthorized",
                "http_status": 401,
                "error_code": "unauthorized_aggregated",
                "error_message": (
                    f"{tally.counted} more failed authentications from {source} in a {self.window_s:g} s window; "
                    f"counted here instead of one row each (the first {self.allowance} are logged in full)"
                ),
                "response_json": _encode(
                    {"count": tally.counted, "endpoints": dict(tally.endpoints), "window_s": self.window_s}
                ).decode(),
                "client_ip": None if shared else address,
            }
        ]
