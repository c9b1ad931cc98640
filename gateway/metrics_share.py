"""Metrics across the worker processes of `gateway serve --workers N`: snapshot files, summed at scrape.

prometheus-client's multiprocess mode only sees its own Counter/Gauge/Histogram objects (backed
by mmap files); the gateway's per-request figures are plain dicts turned into families at scrape
time (gateway.metrics says why: a tenth of the cost per request), and its live gauges are read
from objects that only the worker holding them can read. So each worker writes what its
registry yields, every `FLUSH_S` seconds and once more after its drain, to
`DIR/worker-<index>.json` (written aside, then renamed: a reader never sees half a file), and
the worker that answers a scrape merges its own fresh figures with the other workers' files:

- counters and histograms are summed over every worker, and over `retired.json`, where the parent
  folds the counters of each worker that died or stopped, so a restart never makes a counter go
  down. What a worker killed with SIGKILL counted since its last write (at most `FLUSH_S`) is lost.
- gauges are taken from live workers only: summed where they are amounts per process (queue rows,
  spool bytes, requests in flight, cache entries, shadows in flight), else the largest value
  (backend up, index size and version, the config version, eval results: the same in every worker).

The side `--metrics-port` is served by the parent from the files alone (at most `FLUSH_S` old).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics
    from gateway.services import Services

log = logging.getLogger("gateway.metrics")
FLUSH_S = 1.0
RETIRED = "retired.json"
SUMMED_GAUGES = frozenset({
    "gateway_audit_queue_rows",
    "gateway_audit_spool_bytes",
    "gateway_backend_in_flight",
    "gateway_retrieval_query_embedding_cache_entries",
    "gateway_retrieval_result_cache_entries",
    "gateway_shadow_in_flight",
})  # fmt: skip

# One family: name, type, help, samples (sample name, labels, value).
Family = tuple[str, str, str, list[tuple[str, dict[str, str], float]]]
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]).decode


def families(registry: CollectorRegistry) -> list[Family]:
    """What a registry yields now, as plain data."""
    return [
        (m.name, m.type, m.documentation, [(s.name, dict(s.labels), float(s.value)) for s in m.samples])
        for m in registry.collect()
    ]


def merge(snapshots: Iterable[tuple[list[Family], bool]]) -> list[Metric]:
    """Sum (counters, histograms; gauges of `SUMMED_GAUGES`) or take the largest (other gauges) per
    sample; a snapshot marked not live contributes no gauges."""
    merged: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for snapshot, live in snapshots:
        for name, kind, documentation, samples in snapshot:
            if kind == "gauge" and not live:
                continue
            values = merged.setdefault(name, (kind, documentation, {}))[2]
            summed = kind != "gauge" or name in SUMMED_GAUGES
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                before = values.get(key)
                values[key] = value if before is None else (before + value if summed else max(before, value))
    out = []
    for name, (kind, documentation, values) in merged.items():
        metric = Metric(name, documentation, kind)
        for (sample, pairs), value in values.items():
            metric.add_sample(sample, dict(pairs), value)
        out.append(metric)
    return out


def _path(directory: Path, index: int) -> Path:
    return directory / f"worker-{index}.json"


def _read(path: Path) -> list[Family] | None:
    try:
        return _decode(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as exc:
        log.warning("metrics: skipping the snapshot %s: %s", path, exc)
        return None


def _write(path: Path, snapshot: list[Family]) -> None:
    aside = path.with_name(f".{path.name}.{os.getpid()}")
    aside.write_bytes(_encode(snapshot))
    os.replace(aside, path)


def others(directory: Path, skip: int | None = None) -> Iterator[tuple[list[Family], bool]]:
    """The snapshots of the workers (all, or all but `skip`), then the retired counters."""
    for path in sorted(directory.glob("worker-*.json")):
        if skip is not None and path == _path(directory, skip):
            continue
        snapshot = _read(path)
        if snapshot is not None:
            yield snapshot, True
    retired = _read(directory / RETIRED)
    if retired is not None:
        yield retired, False


def retire(directory: Path, index: int) -> None:
    """Fold a gone worker's counters into the retired file (the parent, the only writer, calls this)."""
    path = _path(directory, index)
    snapshot = _read(path)
    if snapshot is None:
        return
    retired = _read(directory / RETIRED) or []
    kept = merge([(retired, False), (snapshot, False)])
    _write(directory / RETIRED, [(m.name, m.type, m.documentation, [(s.name, dict(s.labels), s.value)
                                                                     for s in m.samples]) for m in kept])  # fmt: skip
    path.unlink(missing_ok=True)


class _Merged:
    def __init__(self, load: Any) -> None:
        self._load = load

    def collect(self) -> Iterator[Metric]:
        yield from merge(self._load())


class MetricsShare:
    """One worker's side of the sharing: writes its snapshot, renders the sum of all workers."""

    def __init__(self, metrics: GatewayMetrics, directory: Path, index: int) -> None:
        self.metrics = metrics
        self.directory = directory
        self.index = index
        self._task: asyncio.Task[None] | None = None
        merged = CollectorRegistry(auto_describe=False)
        merged.register(_Merged(self._snapshots))
        self._merged = merged

    @classmethod
    def attach(cls, services: Services, directory: Path, index: int) -> MetricsShare:
        """Share `services`' metrics (built here if the main port's /metrics is off: the parent's side
        port still needs this worker's figures)."""
        from gateway.metrics import build_metrics

        if services.metrics is None:
            services.metrics = build_metrics(services)
            services.observers.append(services.metrics.observe)
        share = cls(services.metrics, directory, index)
        services.metrics.share = share
        return share

    def _snapshots(self) -> Iterator[tuple[list[Family], bool]]:
        yield families(self.metrics.registry), True  # this worker's, fresh
        yield from others(self.directory, skip=self.index)

    def render(self) -> bytes:
        return generate_latest(self._merged)

    def write(self) -> None:
        try:
            _write(_path(self.directory, self.index), families(self.metrics.registry))
        except OSError as exc:
            log.warning("metrics: writing this worker's snapshot failed: %s", exc)

    def start(self) -> None:
        """Write every FLUSH_S seconds from now on (call on the event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="metrics-share")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            with contextlib.suppress(Exception):
                self.write()


class SideServer:
    """The parent's `--metrics-port`: prometheus-client's small HTTP server over the merged files."""

    def __init__(self, directory: Path, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(lambda: others(directory)))
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_side_port(directory: Path, host: str, port: int) -> SideServer:
    return SideServer(directory, host, port)
