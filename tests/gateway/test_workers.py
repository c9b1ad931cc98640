"""`gateway serve --workers N` as a user runs it: one port, N processes, every answer audited, a
SIGKILLed worker replaced, limits exact across workers with Redis, /metrics summed, SIGTERM drains."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from gateway.metrics import GatewayMetrics
from gateway.metrics_share import MetricsShare, families, merge, retire
from gateway.settings import Settings, SettingsError, load_settings
from gateway.workers import AUTO_WORKERS_MAX, WORKER_HEADER, auto_workers, usable_cores
from serving.fake import FakeBackendThread
from tests.gateway.test_limits import REDIS_URL, _drop_prefix, needs_redis
from tests.gateway.test_serve_lifecycle import GUARDS_OFF, ROOT, free_port, gateway_env, ready, wait_until
from tests.helpers import PG_ADMIN, audit_rows, throwaway_postgres

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello workers"}]}


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    settings: Settings
    answered_by: set[str] = field(default_factory=set)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def post(self, body: dict[str, object] = CHAT, key: str | None = None) -> httpx.Response:
        """One request on a fresh connection, so the kernel may hand it to either worker."""
        headers = {"authorization": f"Bearer {key}"} if key else {}
        answer = httpx.post(self.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        self.answered_by.add(answer.headers.get(WORKER_HEADER, "?"))
        return answer

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(90)


@pytest.fixture
def start(tmp_path: Path, fake_backend: FakeBackendThread) -> Iterator[object]:
    started: list[Gateway] = []

    def run(*flags: str, keys: bool = False, **settings: str) -> Gateway:
        port = free_port()
        command = [sys.executable, "-m", "gateway.cli", "serve", "--backend", fake_backend.url]
        command += [] if keys else ["--open"]
        command += ["--port", str(port), "--policy", str(GUARDS_OFF), *flags]
        log = tmp_path / f"gateway-{len(started)}.log"
        with log.open("wb") as out:
            env = gateway_env(tmp_path, log_level="info", **settings)
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        database = settings.get("database")
        gateway = Gateway(process, f"http://127.0.0.1:{port}", log, Settings(data_dir=tmp_path, database=database))
        started.append(gateway)

        def up() -> bool:
            assert process.poll() is None, gateway.text()[-3000:]
            return ready(gateway.url)

        wait_until(up, 120, "the gateway did not start")
        return gateway

    yield run
    for gateway in started:
        if gateway.process.poll() is None:
            gateway.process.kill()
            gateway.process.wait(10)


def worker_pids(gateway: Gateway) -> set[int]:
    """The live workers: the parent's children that run the gateway (not multiprocessing's tracker)."""
    children = Path(f"/proc/{gateway.process.pid}/task/{gateway.process.pid}/children").read_text().split()
    return {int(pid) for pid in children if "spawn_main" in _cmdline(int(pid))}


def _cmdline(pid: int) -> str:
    """A process's command line; empty for one that exited since it was listed (a killed worker)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def total(metrics: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", metrics, flags=re.MULTILINE))


@pytest.mark.slow
def test_two_workers_share_the_port_audit_every_answer_sum_their_metrics_and_drain(start: object) -> None:
    side = free_port()
    gateway: Gateway = start("--workers", "2", metrics="open", metrics_port=str(side))  # type: ignore[operator]
    assert len(worker_pids(gateway)) == 2
    request_ids = []
    deadline = time.monotonic() + 60
    while len(gateway.answered_by) < 2 or len(request_ids) < 30:
        assert time.monotonic() < deadline, f"only {gateway.answered_by} answered"
        answer = gateway.post()
        assert answer.status_code == 200, answer.text
        request_ids.append(answer.headers["x-gateway-request-id"])
    assert {int(w.split(".")[1]) for w in gateway.answered_by} == worker_pids(gateway)

    def summed(url: str) -> bool:  # each worker writes its figures every second; the scraped one is fresh
        metrics = httpx.get(url + "/metrics", timeout=10).text
        counted = total(metrics, "gateway_requests_total"), total(metrics, "gateway_audit_rows_committed_total")
        return counted == (len(request_ids), len(request_ids))

    wait_until(lambda: summed(gateway.url), 10, "/metrics does not sum the requests of both workers")
    wait_until(lambda: summed(f"http://127.0.0.1:{side}"), 10, "the side port does not sum both workers")
    assert gateway.stop() == 0, gateway.text()[-3000:]
    stored = {row["request_id"] for row in audit_rows(gateway.settings) if row["endpoint"] == "chat.completions"}
    assert stored == set(request_ids)


@pytest.mark.slow
def test_sigterm_to_the_parent_lets_a_worker_finish_its_stream_and_exits_0(start: object) -> None:
    import json

    from tests.gateway.test_serve_lifecycle import refused

    gateway: Gateway = start("--workers", "2")  # type: ignore[operator]
    body = {**CHAT, "stream": True, "fake": {"answer": "one two three four", "trickle_ms": 4, "trickle_after": 1}}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=60) as answer:
        assert answer.status_code == 200
        chunks = answer.iter_bytes()
        received = next(chunks)
        gateway.process.send_signal(signal.SIGTERM)
        wait_until(lambda: refused(gateway.url), 30, "the workers still accept connections after SIGTERM")
        received += b"".join(chunks)
    events = [line[6:] for line in received.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"  # the whole stream, not a cut one
    assert gateway.process.wait(60) == 0, gateway.text()[-3000:]
    request_id = json.loads(events[-2])["gateway"]["request_id"]
    (stored,) = audit_rows(gateway.settings, request_id=request_id)
    assert stored["status"] == "ok" and stored["stream"]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The audit database the workers share: SQLite in DATA_DIR, or a throw-away PostgreSQL one."""
    if request.param == "sqlite":
        yield {}
        return
    with throwaway_postgres("gw_workers") as name:
        yield {"database": f"{PG_ADMIN}/{name}"}


@pytest.mark.slow
def test_a_sigkilled_worker_loses_no_delivered_answers_audit_row_and_comes_back(
    start: object, database: dict[str, str]
) -> None:
    gateway: Gateway = start("--workers", "2", **database)  # type: ignore[operator]
    before = worker_pids(gateway)
    delivered: list[str] = []
    failed: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                answer = gateway.post()
            except httpx.TransportError as exc:  # the killed worker's connections are reset
                failed.append(type(exc).__name__)
                continue
            if answer.status_code == 200:
                delivered.append(answer.headers["x-gateway-request-id"])
            else:
                failed.append(str(answer.status_code))

    threads = [threading.Thread(target=load) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(delivered) >= 40, 60, "no load went through")
        victim = min(before)
        subprocess.run(["kill", "-KILL", str(victim)], check=True)
        wait_until(lambda: len(worker_pids(gateway)) == 2 and victim not in worker_pids(gateway), 60,
                   "the killed worker was not replaced")  # fmt: skip
        (replacement,) = worker_pids(gateway) - before
        wait_until(lambda: any(w.endswith(f".{replacement}") for w in gateway.answered_by), 90,
                   "the new worker serves nothing")  # fmt: skip
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    # Only the killed worker's own connections fail; the replacement never answers 503 "starting".
    assert not [f for f in failed if f.isdigit()], failed
    assert re.search(rf"worker \d \(pid {victim}\) exited with code -9 after .*; starting a new one", gateway.text())
    assert gateway.stop() == 0, gateway.text()[-3000:]
    stored = {row["request_id"] for row in audit_rows(gateway.settings) if row["endpoint"] == "chat.completions"}
    missing = set(delivered) - stored
    assert not missing, f"{len(missing)} of {len(delivered)} delivered answers have no audit row"


@pytest.mark.slow
@needs_redis
def test_a_rate_limit_is_exact_across_two_workers_with_redis(start: object) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    gateway: Gateway = start("--workers", "2", "--redis", REDIS_URL, redis_prefix=prefix, keys=True)  # type: ignore[operator]
    try:
        secret = _limited_key(gateway, rpm=6)
        answers = [gateway.post(key=secret).status_code for _ in range(20)]
        assert len(gateway.answered_by) == 2, "one worker took every request: the test proves nothing"
        assert answers.count(200) == 6 and answers.count(429) == 14, answers  # a burst of the whole minute
        assert gateway.stop() == 0
    finally:
        import asyncio

        asyncio.run(_drop_prefix(prefix))


@pytest.mark.slow
def test_without_redis_limits_keep_the_gateway_on_one_worker_and_say_why(start: object) -> None:
    gateway: Gateway = start("--workers", "2", model_limits="fake-model:rpm=1000", keys=True)  # type: ignore[operator]
    assert "running 1 worker, not 2: model limits are set and no --redis" in gateway.text()
    assert worker_pids(gateway) == set()  # the single-process server: no worker processes
    assert gateway.stop() == 0


@pytest.mark.slow
def test_workers_that_keep_failing_at_start_up_stop_the_gateway_with_exit_1(
    tmp_path: Path, fake_backend: FakeBackendThread
) -> None:
    command = [sys.executable, "-m", "gateway.cli", "serve", "--open", "--backend", fake_backend.url]
    command += ["--port", str(free_port()), "--policy", str(GUARDS_OFF), "--workers", "2"]
    (tmp_path / "spool").write_text("a file where the audit spool folder goes: every worker fails to start")
    done = subprocess.run(command, cwd=ROOT, env=gateway_env(tmp_path, log_level="info"), capture_output=True,
                          timeout=240)  # fmt: skip
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 1, output[-3000:]
    assert "3 workers in a row failed to start: stopping" in output, output[-3000:]
    assert len(re.findall(r"worker \d \(pid \d+\) exited with code", output)) == 3  # no restart loop


def _limited_key(gateway: Gateway, rpm: int) -> str:
    command = [sys.executable, "-m", "gateway.cli", "keys", "create", "--role", "client", "--rpm", str(rpm)]
    done = subprocess.run(command, cwd=ROOT, env=gateway_env(Path(gateway.settings.data_dir)), capture_output=True,
                          timeout=60, check=True)  # fmt: skip
    return done.stdout.decode().strip().splitlines()[-1]


def _counting(requests: float, queue: float, up: float) -> GatewayMetrics:
    """A worker's metrics: `requests` requests counted, and two live gauges."""
    from prometheus_client.core import GaugeMetricFamily

    metrics = GatewayMetrics(
        live=lambda: [
            GaugeMetricFamily("gateway_audit_queue_rows", "queued", value=queue),
            GaugeMetricFamily("gateway_backend_up", "up", value=up),
        ]
    )
    metrics.requests[("chat.completions", "m", "b", "2xx", "ok")] = requests
    return metrics


def test_metrics_of_workers_are_summed_and_a_gone_workers_counters_stay(tmp_path: Path) -> None:
    first, second = _counting(3, queue=2, up=1), _counting(4, queue=5, up=0)
    share = MetricsShare(first, tmp_path, 0)
    first.share = share
    MetricsShare(second, tmp_path, 1).write()
    text = first.render().decode()
    assert total(text, "gateway_requests_total") == 7
    assert total(text, "gateway_audit_queue_rows") == 7  # an amount per process: summed
    assert total(text, "gateway_backend_up") == 1  # the same fact seen by each: the largest
    first.requests[("chat.completions", "m", "b", "2xx", "ok")] = 10  # the scraped worker's figures are fresh
    assert total(first.render().decode(), "gateway_requests_total") == 14

    retire(tmp_path, 1)  # worker 1 died: its counters stay, its gauges go
    text = first.render().decode()
    assert total(text, "gateway_requests_total") == 14 and total(text, "gateway_audit_queue_rows") == 2
    MetricsShare(_counting(1, queue=0, up=1), tmp_path, 1).write()  # its replacement starts from zero
    assert total(first.render().decode(), "gateway_requests_total") == 15  # the sum never goes down


def test_histograms_merge_bucket_by_bucket() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    snapshots = []
    for values in ([0.1, 0.2], [0.3]):
        registry = CollectorRegistry()
        histogram = Histogram("x_seconds", "x", registry=registry, buckets=(0.15, 1.0))
        for value in values:
            histogram.observe(value)
        snapshots.append((families(registry), True))
    (merged,) = [m for m in merge(snapshots) if m.name == "x_seconds"]
    samples = {(s.name, s.labels.get("le")): s.value for s in merged.samples}
    assert samples[("x_seconds_bucket", "0.15")] == 1 and samples[("x_seconds_bucket", "1.0")] == 3
    assert samples[("x_seconds_count", None)] == 3 and round(samples[("x_seconds_sum", None)], 6) == 0.6


async def test_a_sqlite_write_lock_held_by_another_worker_is_waited_for_not_spooled(tmp_path: Path) -> None:
    """Two workers share one SQLite file: a commit that meets the other's write lock waits (busy
    timeout `audit_db_wait`) and lands in SQL; it spools only when the lock outlasts that wait."""
    import asyncio
    import sqlite3

    from gateway.audit import AuditWriter
    from gateway.audit_sinks import sink_for
    from gateway.db import audit_records, create_engine
    from tests.gateway.test_audit import count, row, sqlite_url

    url = await asyncio.to_thread(sqlite_url, tmp_path)
    engine = create_engine(url)
    sink = sink_for(engine, audit_records, wait_s=2.0)
    writer = AuditWriter(engine, spool_path=tmp_path / "spool.jsonl", sink=sink, db_wait_s=2.0)
    await writer.start()
    other = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)  # the other worker's writer
    try:
        other.execute("BEGIN IMMEDIATE")  # holds the write lock, as a commit in flight does
        rows = [row() for _ in range(20)]
        began = time.monotonic()
        waiting = asyncio.gather(*(writer.submit(r) for r in rows))
        await asyncio.sleep(0.8)
        other.execute("COMMIT")
        await waiting
        waited = time.monotonic() - began
        assert writer.spooled == 0 and writer.committed == 20
        assert 0.7 < waited < 2.0  # committed right after the lock went, not after a spool-and-replay
        assert await count(url) == 20

        other.execute("BEGIN IMMEDIATE")  # a lock held past audit_db_wait: the rows spool (never lost)
        late = asyncio.gather(*(writer.submit(row()) for _ in range(5)))
        await asyncio.sleep(2.6)
        other.execute("COMMIT")
        await late
        assert writer.spooled == 5
    finally:
        other.close()
        await writer.stop()
        await engine.dispose()
    assert await count(url) == 25  # the spool was replayed


@pytest.mark.slow
def test_sighup_to_the_parent_reloads_the_settings_file_in_every_worker(
    tmp_path: Path, fake_backend: FakeBackendThread
) -> None:
    from tests.gateway.test_rollout_sighup import deployments

    config = tmp_path / "gateway.toml"
    config.write_text(deployments(fake_backend.url, 100, 0), encoding="utf-8")
    port = free_port()
    command = [sys.executable, "-m", "gateway.cli", "serve", "--open", "--port", str(port), "--config", str(config)]
    command += ["--policy", str(GUARDS_OFF)]
    log = tmp_path / "serve.log"
    env = gateway_env(tmp_path, workers="2", config_poll="30")  # the poll alone would take up to 30 s
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    gateway = Gateway(process, f"http://127.0.0.1:{port}", log, Settings(data_dir=tmp_path))
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}

    def deployment_by_worker() -> dict[str, set[str]]:
        seen: dict[str, set[str]] = {}
        for _ in range(24):
            answer = gateway.post(chat)
            seen.setdefault(answer.headers[WORKER_HEADER], set()).add(answer.headers["x-gateway-deployment"])
        return seen

    try:
        wait_until(lambda: ready(gateway.url) and len(worker_pids(gateway)) == 2, 120, "the gateway did not start")
        wait_until(lambda: len(deployment_by_worker()) == 2, 60, "one worker answers everything")
        config.write_text(deployments(fake_backend.url, 0, 100), encoding="utf-8")
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: set().union(*deployment_by_worker().values()) == {"green"}, 10, "a worker still on blue")
        assert len(deployment_by_worker()) == 2 and process.poll() is None
        assert gateway.stop() == 0, gateway.text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.slow
def test_auto_starts_one_worker_per_usable_core(start: object) -> None:
    gateway: Gateway = start(workers="auto")  # type: ignore[operator]
    expected = auto_workers()
    if expected == 1:  # a one-core machine: the single-process server
        assert worker_pids(gateway) == set()
    else:
        assert len(worker_pids(gateway)) == expected
        assert f"with {expected} workers" in gateway.text()
    assert gateway.post().status_code == 200
    assert gateway.stop() == 0


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_usable_cores_follow_affinity_and_a_cgroup_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    v2, v1 = "0::/\n", "4:cpu,cpuacct:/\n"

    def cores(name: str, files: dict[str, str], membership: str = v2) -> int:
        return usable_cores(_cgroup(tmp_path / name, files), membership)

    assert cores("none", {}) == affinity
    assert cores("v2-max", {"cpu.max": "max 100000\n"}) == affinity
    # a container limited to 1.5 CPUs may run 2 processes at once; 0.2 CPUs still gets one
    assert cores("v2", {"cpu.max": "150000 100000\n"}) == min(affinity, 2)
    assert cores("v2-small", {"cpu.max": "20000 100000\n"}) == 1
    quota_v1 = {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert cores("v1", quota_v1, v1) == 1
    unlimited = {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert cores("v1-none", unlimited, v1) == affinity
    assert cores("garbled", {"cpu.max": "lots\n"}) == affinity
    # our own cgroup, deeper in the tree (no cgroup namespace), and a parent's limit above it
    nested = {"kubepods/pod1/ctr/cpu.max": "max 100000\n", "kubepods/pod1/cpu.max": "100000 100000\n"}
    assert cores("nested", nested, "0::/kubepods/pod1/ctr\n") == 1
    nested_v1 = {"cpu/docker/abc/cpu.cfs_quota_us": "200000\n", "cpu/docker/abc/cpu.cfs_period_us": "100000\n"}
    assert cores("nested-v1", nested_v1, "3:cpu,cpuacct:/docker/abc\n") == min(affinity, 2)
    # no /proc/self/cgroup to go by: the root of the tree is read
    assert cores("no-membership", {"cpu.max": "100000 100000\n"}, "") == 1


def test_workers_setting_takes_auto_a_number_or_says_what_is_wrong() -> None:
    assert load_settings(environ={}).workers == 0  # the default: auto
    assert load_settings({"workers": "auto"}, environ={}).workers == 0
    assert load_settings({"workers": "3"}, environ={}).workers == 3
    assert load_settings(environ={"GATEWAY_WORKERS": "AUTO"}).workers == 0
    with pytest.raises(SettingsError, match="workers"):
        load_settings({"workers": "-1"}, environ={})
    with pytest.raises(SettingsError, match="workers"):
        load_settings({"workers": "many"}, environ={})
    assert 1 <= auto_workers() <= AUTO_WORKERS_MAX
