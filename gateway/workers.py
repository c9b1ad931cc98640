"""`gateway serve --workers N`: N worker processes serve one port; the parent supervises them.

Why processes: one gateway process tops out at one core (the event loop, guards and JSON work
all hold the GIL), so on a machine with cores to spare plain traffic leaves capacity unused.
Several workers on one machine are treated exactly like several replicas of the gateway, a
design that already holds (tests/gateway/test_replicas*.py): everything that must agree across
them goes through the database or Redis, never through shared memory.

  parent   parses the settings, migrates the database and bootstraps the admin key once, starts
           the local vLLM once (when no --backend is given: every worker gets its URL as the
           backend), binds the port once, then spawns the workers and supervises:
           a worker that dies is restarted (one log line); workers that keep dying before they
           were ever ready (a bad setting, a model that does not load) stop the gateway with
           exit 1 instead of a restart loop. SIGTERM/SIGINT are forwarded as SIGTERM (a second
           SIGINT would make uvicorn cut streams); SIGHUP (config reload) is forwarded as is.
           Exit 0 after SIGTERM only when every worker drained, as a single process does.
  worker   `create_app` + `DrainingServer` on the port, exactly what the single-process
           server runs: its own audit writer (group commit, awaited before a response's last
           byte) with its own spool file (`ReplicaSpool`: named by pid, flock-held; a restarted
           worker takes over the spool of the one that died), its own backend client pool.

Connections are spread by the kernel: on Linux each worker listens on its own SO_REUSEPORT socket
of the port (the parent holds one bound but not listening, so the port stays reserved), and the
kernel hashes each new connection to one of the listening ones. With one shared socket (as in
uvicorn's and gunicorn's supervisors, and here where SO_REUSEPORT is missing) the first worker to
wake accepts every pending connection: a pool of 32 keep-alive connections split 348/36 in a
measurement, leaving the second core mostly idle (168/216 with SO_REUSEPORT).

A worker loads its models in the app's lifespan, before its socket listens: it takes no
connection it would answer 503 "starting", and a dead worker's socket leaves the group with it.
Unlike one process, the port so answers nothing (connections are refused) until the first worker
has loaded, a few seconds. (Letting worker 0 answer while it loads, as one process does, was
tried: worker 1 loaded first, /readyz said 200 from it, and 14 of 384 requests then got 503 from
worker 0.) uvicorn's own `Multiprocess` supervisor is not used: it needs an import string for the
app, reports no drain result, and restarts forever.

What is shared and how:
- limits: exact only with `--redis` (one Lua script per check, as for replicas). Without Redis
  the counters are per process, N times too lenient; so with limits configured (model limits,
  or any active key with a limit at start-up) and no Redis, the gateway runs ONE worker and says
  why in one log line. A limit given to a key later, while N workers run without Redis, is
  enforced per worker until the next start.
- sessions, keys, config versions, rollups, eval runs: in the database already (sessions are
  cached 5 s per process, as across replicas).
- metrics: per-request figures are plain dicts in each worker (gateway.metrics explains why not
  prometheus-client's objects), so prometheus-client's multiprocess mode cannot see them; instead
  each worker writes a snapshot of its families to a shared temporary folder every second and
  /metrics sums them (gateway.metrics_share). The side `--metrics-port` is served by the parent
  from the same files.
- SQLite: every process opens it in WAL mode with a busy timeout of `audit_db_wait`, so a worker
  whose commit meets another's write lock waits for it, and spools only after that wait.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess

    from gateway.settings import Settings
    from serving.local import LocalStart

log = logging.getLogger("gateway")

WORKER_HEADER = "x-gateway-worker"  # INDEX.PID of the worker that answered
START_FAILURES_MAX = 3  # workers that die before ever being ready, in a row: give up (exit 1)
_POLL_S = 0.2
_STOP_MARGIN_S = 30.0  # after shutdown_grace: the lifespan shutdown (audit queue commit) may take this long


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What one worker process is handed (pickled by multiprocessing's spawn)."""

    settings: Settings
    index: int
    sock: socket.socket | None  # the shared listening socket; None: bind one with SO_REUSEPORT
    ready: Connection  # the worker sends "ready" once its models are loaded
    metrics_dir: Path | None  # the shared folder of metric snapshots (None: metrics off)


#: `workers = "auto"` starts one worker per usable core, but no more than this: each worker loads
#: its own guard and embedding models (880 MB resident measured here with the default policy and
#: RAG), so a laptop with many cores is not filled with copies; ask for more by number.
AUTO_WORKERS_MAX = 4


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup"), membership: str | None = None) -> int:
    """The cores this process may run on: its CPU affinity, lowered to a cgroup's CPU quota (a
    container's `--cpus`, a Kubernetes CPU limit), which os.cpu_count() does not see.

    The quota is looked up in this process's own cgroup and every cgroup above it (a parent's
    limit applies too), cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us`), under `cgroup`; which
    cgroup is ours comes from `membership` (the text of /proc/self/cgroup, read when None)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quotas = [q for folder in _cgroup_folders(cgroup, membership) if (q := _cpu_quota(folder)) is not None]
    if quotas:
        cores = min(cores, max(1, int(min(quotas) + 0.999)))
    return max(1, cores)


def _cgroup_folders(cgroup: Path, membership: str | None) -> list[Path]:
    """Folders that may hold this process's CPU quota: its cgroup and those above it, v2 and v1."""
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            membership = ""
    folders: list[Path] = []
    for line in membership.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base = cgroup  # v2: one unified tree
        elif "cpu" in controllers.split(","):
            base = cgroup / ("cpu" if (cgroup / "cpu").exists() else controllers)
        else:
            continue
        relative = Path(path.strip().lstrip("/"))
        for depth in range(len(relative.parts), -1, -1):
            folders.append(base.joinpath(*relative.parts[:depth]))
    return folders or [cgroup, cgroup / "cpu"]


def _cpu_quota(folder: Path) -> float | None:
    """CPUs allowed by the quota in `folder` (None: no limit there, or no such files)."""
    try:  # cgroup v2: "max 100000" or "150000 100000"
        limit, period = (folder / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        limit_us = int((folder / "cpu.cfs_quota_us").read_text())
        period_us = int((folder / "cpu.cfs_period_us").read_text())
        return limit_us / period_us if limit_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def auto_workers() -> int:
    """`workers = "auto"`: one per usable core, at most AUTO_WORKERS_MAX.

    Why several processes: one gateway process runs its Python on one core at a time (the GIL),
    and with the default guards a request costs ~1.2 ms of that core. On this project's 2-core
    machine, with the load generator and the backend on the same cores, 2 workers served 31-47 %
    more guarded requests/s than 1 at concurrency 32 (benchmarks/bench_gateway.py throughput,
    benchmarks/bench_workers.py; README "Speed"); with guards off, where the one process is not
    the limit there, a second worker gained nothing."""
    return min(usable_cores(), AUTO_WORKERS_MAX)


def limits_need_one_worker(settings: Settings) -> str | None:
    """Why N workers would not keep the limits exact (no Redis, limits configured); None if they would."""
    if settings.redis or settings.workers <= 1:
        return None
    if settings.model_limits:
        return "model limits are set"
    if _keys_with_limits(settings):
        return "API keys with limits exist"
    return None


def _keys_with_limits(settings: Settings) -> bool:
    import asyncio

    from sqlalchemy import or_, select

    from gateway.db import api_keys
    from gateway.settings import open_engine

    c = api_keys.c
    limited = or_(*(column.is_not(None) for column in (c.rpm, c.tpm, c.max_concurrent, c.tokens_per_day,
                                                        c.tokens_per_month)))  # fmt: skip

    async def go() -> bool:
        async with open_engine(settings) as engine, engine.connect() as conn:
            query = select(c.id).where(c.revoked_at.is_(None), limited).limit(1)
            return (await conn.execute(query)).first() is not None

    return bool(asyncio.run(go()))


REUSE_PORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def bind_socket(host: str, port: int) -> socket.socket:
    """The parent's socket. With SO_REUSEPORT: bound, not listening (it reserves the port; each
    worker binds its own); else the one listening socket every worker accepts on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if not REUSE_PORT:
        sock = socket.create_server((host, port), family=family, backlog=4096)
        sock.set_inheritable(True)
        return sock
    return _reuse_port_socket(host, port)


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound with SO_REUSEPORT; uvicorn makes it listen once the worker's app has started."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


# -- the parent ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    index: int
    process: SpawnProcess
    ready: Connection
    started: float
    was_ready: bool = False


@dataclass(slots=True)
class Supervisor:
    """Starts N workers on one socket, restarts those that die, stops them all on a signal."""

    settings: Settings
    sock: socket.socket
    metrics_dir: Path | None = None
    on_all_ready: Any = None  # called once, when every worker has been ready at least once
    slots: dict[int, _Slot] = field(default_factory=dict)
    restarts: int = 0
    stop_signal: int | None = None
    _start_failures: int = 0
    _ctx: Any = field(default_factory=lambda: multiprocessing.get_context("spawn"))

    def start(self) -> None:
        for index in range(self.settings.workers):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        receive, send = self._ctx.Pipe(duplex=False)
        shared = None if REUSE_PORT else self.sock
        spec = WorkerSpec(self.settings, index, shared, send, self.metrics_dir)
        process = self._ctx.Process(target=worker_main, args=(spec,), name=f"gateway-worker-{index}", daemon=False)
        process.start()
        send.close()  # the child holds its end; EOF on ours once it is gone
        self.slots[index] = _Slot(index, process, receive, time.monotonic())

    def request_stop(self, signum: int) -> None:
        """Tell every worker to drain (SIGTERM, whatever the parent got)."""
        if self.stop_signal is None:
            self.stop_signal = signum
        for slot in self.slots.values():
            _signal(slot.process.pid, signal.SIGTERM)

    def forward(self, signum: int) -> None:
        for slot in self.slots.values():
            _signal(slot.process.pid, signum)

    def run(self) -> int:
        """Supervise until a stop is requested (0: every worker drained) or workers cannot start (1)."""
        while self.stop_signal is None:
            sentinels: dict[Any, _Slot] = {s.process.sentinel: s for s in self.slots.values()}
            readers: dict[Any, _Slot] = {s.ready: s for s in self.slots.values() if not s.was_ready}
            for ready in wait([*sentinels, *readers], timeout=_POLL_S):
                if ready in readers:
                    self._mark_ready(readers[ready])
            for slot in list(self.slots.values()):
                if slot.process.is_alive() or self.stop_signal is not None:
                    continue
                if not self._replace(slot):
                    self.request_stop(signal.SIGTERM)
                    self._stop_all()
                    return 1
        return 0 if self._stop_all() and self.stop_signal == signal.SIGTERM else 128 + self.stop_signal

    def _mark_ready(self, slot: _Slot) -> None:
        with contextlib.suppress(EOFError, OSError):
            if slot.ready.poll() and slot.ready.recv() == "ready":
                slot.was_ready = True
                self._start_failures = 0
                if self.on_all_ready is not None and all(s.was_ready for s in self.slots.values()):
                    callback, self.on_all_ready = self.on_all_ready, None
                    callback()

    def _replace(self, slot: _Slot) -> bool:
        """A worker died: restart it, unless workers keep dying before they are ever ready."""
        process = slot.process
        process.join()
        slot.ready.close()
        if self.metrics_dir is not None:
            from gateway.metrics_share import retire

            retire(self.metrics_dir, slot.index)
        if not slot.was_ready:
            self._start_failures += 1
            if self._start_failures >= START_FAILURES_MAX:
                log.error(
                    "worker %d (pid %s) exited with code %s before it was ready; %d workers in a row failed "
                    "to start: stopping (the reason is logged above)",
                    slot.index, process.pid, process.exitcode, self._start_failures,
                )  # fmt: skip
                return False
        self.restarts += 1
        log.warning(
            "worker %d (pid %s) exited with code %s after %.0f s; starting a new one",
            slot.index, process.pid, process.exitcode, time.monotonic() - slot.started,
        )  # fmt: skip
        self._spawn(slot.index)
        return True

    def _stop_all(self) -> bool:
        """Wait for every worker to drain (they were sent SIGTERM); True if all exited 0."""
        deadline = time.monotonic() + self.settings.shutdown_grace + _STOP_MARGIN_S
        drained = True
        for slot in self.slots.values():
            slot.process.join(max(deadline - time.monotonic(), 0.1))
            if slot.process.is_alive():
                log.error("worker %d (pid %s) did not stop in time: killing it", slot.index, slot.process.pid)
                slot.process.kill()
                slot.process.join(10)
            if slot.process.exitcode != 0:
                drained = False
                log.warning("worker %d (pid %s) stopped with code %s (not a complete drain)",
                            slot.index, slot.process.pid, slot.process.exitcode)  # fmt: skip
            slot.ready.close()
        return drained


def _signal(pid: int | None, signum: int) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def serve_workers(settings: Settings) -> int:
    """`gateway serve` with `workers > 1`, after the database is prepared: see the module docstring."""
    from gateway.cli import _safe_url, _start_local
    from gateway.httpserver import ReadyLine

    supervisor: Supervisor | None = None
    starting: LocalStart | None = None

    def on_signal(signum: int, _frame: object) -> None:
        if supervisor is None:
            raise SystemExit(128 + signum)
        supervisor.request_stop(signum)

    def on_hup(signum: int, _frame: object) -> None:
        if supervisor is not None:
            supervisor.forward(signum)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.getsignal(signum) for signum in handled}
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    metrics_dir = None
    metrics_server = None
    sock = None
    try:
        ready = ReadyLine(settings, {"workers"})
        if not settings.backend and not settings.deployments:
            settings, starting = _start_local(settings, ready)  # one vLLM; its URL is every worker's backend
        if settings.metrics != "off" or settings.metrics_port:
            metrics_dir = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
        sock = bind_socket(settings.host, settings.port)
        port = sock.getsockname()[1]
        # The side metrics port is the parent's (workers would collide on it), served from the snapshots;
        # the schema was brought up to date above, once.
        worker_settings = settings.replace(port=port, metrics_port=0, migrate_on_start=False)
        supervisor = Supervisor(worker_settings, sock, metrics_dir, on_all_ready=lambda: ready.done("workers"))
        if metrics_dir is not None and settings.metrics_port:
            from gateway.metrics_share import serve_side_port

            metrics_server = serve_side_port(metrics_dir, settings.host, settings.metrics_port)
        log.info(
            "gateway listening on http://%s:%s with %d workers (backends: %s; database: %s)",
            settings.host, port, settings.workers, ", ".join(settings.backend) or "per deployment",
            _safe_url(settings.database_url),
        )  # fmt: skip
        supervisor.start()
        code = supervisor.run()
        if starting is not None and starting.error is not None:
            return 1
        return code
    finally:
        for signum in handled:
            signal.signal(signum, signal.SIG_IGN)  # the clean-up is not cut short
        if supervisor is not None and any(s.process.is_alive() for s in supervisor.slots.values()):
            supervisor.request_stop(signal.SIGTERM)
            supervisor._stop_all()
        if starting is not None:
            starting.stop()
        if metrics_server is not None:
            metrics_server.close()
        if sock is not None:
            sock.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# -- a worker --------------------------------------------------------------------------------


def worker_main(spec: WorkerSpec) -> None:
    """One worker process: the app and its server on the port. Exit 0 after a complete drain."""
    from gateway.app import create_app
    from gateway.httpserver import DrainingServer, server_config
    from gateway.logs import configure_logging

    settings = spec.settings
    configure_logging(settings.log_level, settings.log_format, worker=spec.index)
    _die_with_parent(settings.shutdown_grace + _STOP_MARGIN_S)
    server: DrainingServer | None = None

    def exit_on_signal(signum: int, _frame: object) -> None:
        # uvicorn raises the signal again once it has drained: land here instead of a signal death.
        raise SystemExit(0 if server is not None and server.drained else 1)

    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGINT, exit_on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload forwarded before the rollout listens must not kill
    app = create_app(settings)  # the lifespan loads the models before the socket listens
    services = app.state.services
    share = None
    if spec.metrics_dir is not None:
        from gateway.metrics_share import MetricsShare

        share = MetricsShare.attach(services, spec.metrics_dir, spec.index)

    def started() -> None:
        if share is not None:
            share.start()
        with contextlib.suppress(OSError):
            spec.ready.send("ready")

    config = server_config(app, settings)
    # Which process answered, on every response (uvicorn adds it: no per-request work of ours).
    config.headers = [(WORKER_HEADER, f"{spec.index}.{os.getpid()}")]
    server = DrainingServer(config)
    server.on_started = started  # after the lifespan (models loaded), once the socket listens
    try:
        sock = spec.sock or _reuse_port_socket(settings.host, settings.port)
        server.run(sockets=[sock])
    finally:
        if share is not None:
            share.write()  # the final figures, after the drain
    if not server.started:  # the start-up failed (uvicorn logged why)
        sys.exit(1)
    sys.exit(0 if server.drained else 1)


def _die_with_parent(grace_s: float) -> None:
    """Drain and exit when the parent dies, so no worker outlives a killed parent: SIGTERM from the
    kernel (Linux prctl), and a thread that looks every second (elsewhere, and in case the signal was
    missed); if the drain has not ended `grace_s` later, exit anyway."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("the gateway's parent process is gone: this worker drains and exits")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
