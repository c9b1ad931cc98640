"""Safe rollout: the reloadable config (deployments, aliases, stickiness, policy), its versions, reload,
rollback, and the per-request seams (route, versions in the audit row, shadow copies).

Config is versioned data. The reloadable part of the settings file and the policy file's text make a
`ConfigSnapshot`, whose version is a hash of its content. Applying one builds everything it needs
first (the deployment router over the shared backend clients, the guardrails for a changed policy),
then swaps the services' pipeline in one step: a request runs start to end on the config it began
with, and nothing in flight is cut. Every applied config is stored (`config_versions`) and every
application is an event (`config_events`); the newest event is the live version, which every
replica polls (`config_poll`, at most 30 s) and follows, so `gateway rollout rollback` reaches all.

At start-up a replica publishes its file's config when that content was never stored before (a new
file), and otherwise follows the live version (so a restart does not undo a rollback). An explicit
reload (SIGHUP, `POST /admin/reload`) always publishes the file it read. An invalid file changes
nothing; the reason is logged and returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from sqlalchemy import desc, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db import config_events, config_versions
from gateway.deployments import BackendPool, build_router, deployment_table, parse_deployments
from gateway.errors import PermissionDenied
from gateway.settings import Settings, SettingsError, load_settings
from gateway.shadow import ShadowRunner, ShadowSource
from guardrails import Policy, PolicyError, default_policy, parse_policy
from serving.backend import Backend
from serving.router import ROUTE, Deployment, DeploymentRouter, RouteContext, Router, begin_route

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from gateway.auth import KeyInfo
    from gateway.services import Services

log = logging.getLogger("gateway.rollout")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
DEPLOYMENT_HEADER = "x-gateway-deployment"


def _gateway_version() -> str:
    try:
        return version("guarded-gateway")
    except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
        return "0+unknown"


GATEWAY_VERSION = _gateway_version()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


class ConfigInvalid(Exception):
    """A settings or policy file that cannot be applied; the running config stays. The message says why."""


@dataclass(frozen=True, slots=True)
class ConfigSnapshot:
    """The reloadable config: what `config_versions` stores and a version names."""

    deployments: tuple[Deployment, ...]
    aliases: tuple[str, ...]
    sticky: str
    policy_text: str | None  # None: the default policy
    policy_source: str | None  # the policy file (relative term files resolve against its folder)
    source: str | None  # the settings file it was read from

    @property
    def policy_version(self) -> str:
        return _digest(self.policy_text.encode()) if self.policy_text is not None else "default"

    @property
    def version(self) -> str:
        content = {
            "deployments": deployment_table(self.deployments),
            "aliases": list(self.aliases),
            "sticky": self.sticky,
            "policy": self.policy_version,
        }
        return _digest(_encode(content))

    def to_json(self) -> str:
        return _encode(
            {
                "deployments": deployment_table(self.deployments),
                "aliases": list(self.aliases),
                "sticky": self.sticky,
                "policy_text": self.policy_text,
                "policy_source": self.policy_source,
                "source": self.source,
            }
        ).decode()

    @classmethod
    def from_json(cls, text: str) -> ConfigSnapshot:
        data = _decode(text)
        return cls(
            deployments=parse_deployments(data.get("deployments") or []),
            aliases=tuple(data.get("aliases") or ()),
            sticky=str(data.get("sticky") or "none"),
            policy_text=data.get("policy_text"),
            policy_source=data.get("policy_source"),
            source=data.get("source"),
        )

    def policy(self) -> Policy:
        """Parse the stored policy text (PolicyError with FILE:LINE when it is wrong)."""
        if self.policy_text is None:
            return default_policy()
        source = self.policy_source or "<stored policy>"
        return parse_policy(self.policy_text, source, Path(source).resolve().parent if self.policy_source else None)

    def summary(self) -> str:
        parts = []
        for d in self.deployments:
            share = f"shadow {d.shadow:g}" if d.shadow else f"weight {d.weight:g}"
            parts.append(f"{d.model}:{d.name}({share})")
        return ", ".join(parts) or "no deployments"


def merge_aliases(pinned: tuple[tuple[str, ...], tuple[str, ...]], from_file: tuple[str, ...]) -> tuple[str, ...]:
    """The embedded default, then the file's aliases, then the flags' (a later alias of a name wins)."""
    before, after = pinned
    return tuple(dict.fromkeys([*before, *from_file, *after]))


def snapshot_of(settings: Settings, aliases: tuple[str, ...] | None = None) -> ConfigSnapshot:
    """The reloadable part of running settings, with the policy file read now."""
    text = None
    if settings.policy is not None:
        try:
            text = Path(settings.policy).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigInvalid(f"cannot read policy file {settings.policy}: {exc}") from None
    return ConfigSnapshot(
        deployments=settings.deployments,
        aliases=settings.alias if aliases is None else aliases,
        sticky=settings.sticky,
        policy_text=text,
        policy_source=str(settings.policy) if settings.policy is not None else None,
        source=str(settings.config) if settings.config is not None else None,
    )


def read_config(
    running: Settings, pinned_aliases: tuple[tuple[str, ...], tuple[str, ...]], pinned_policy: Path | None
) -> ConfigSnapshot:
    """Read the settings file (and the policy file it names) again; ConfigInvalid says what is wrong."""
    if running.config is None:
        fresh = running.replace(alias=())
    else:
        try:
            fresh = load_settings({"config": running.config})
        except SettingsError as exc:
            raise ConfigInvalid(str(exc)) from None
    policy = pinned_policy or fresh.policy
    snapshot = snapshot_of(fresh.replace(policy=policy), merge_aliases(pinned_aliases, fresh.alias))
    try:
        snapshot.policy()
    except PolicyError as exc:
        raise ConfigInvalid(f"invalid policy: {exc}") from None
    return snapshot


class ConfigStore:
    """Config versions and their applications in the database (shared by every replica)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def publish(self, snapshot: ConfigSnapshot, action: str, host: str | None = None) -> None:
        """Store the snapshot (once per version) and record that it was applied now."""
        now = datetime.now(UTC)
        row = {
            "version": snapshot.version,
            "created_at": now,
            "source": snapshot.source,
            "config_json": snapshot.to_json(),
            "policy_version": snapshot.policy_version,
        }
        async with self.engine.begin() as conn:
            exists = await conn.scalar(
                select(config_versions.c.version).where(config_versions.c.version == row["version"])
            )
            if exists is None:
                with contextlib.suppress(IntegrityError):  # another replica stored it first
                    async with conn.begin_nested():
                        await conn.execute(insert(config_versions).values(**row))
            await conn.execute(
                insert(config_events).values(version=snapshot.version, applied_at=now, action=action, host=host)
            )

    async def known(self, version: str) -> bool:
        async with self.engine.connect() as conn:
            found = await conn.scalar(select(config_versions.c.version).where(config_versions.c.version == version))
        return found is not None

    async def live(self) -> str | None:
        """The version applied last (by any replica or by a rollback), or None before the first."""
        async with self.engine.connect() as conn:
            query = select(config_events.c.version).order_by(desc(config_events.c.id)).limit(1)
            return await conn.scalar(query)

    async def get(self, version: str) -> ConfigSnapshot | None:
        """The stored snapshot of `version` (a unique prefix of at least 4 characters will do)."""
        async with self.engine.connect() as conn:
            if len(version) >= 4:
                query = select(config_versions.c.config_json).where(config_versions.c.version.startswith(version))
            else:
                query = select(config_versions.c.config_json).where(config_versions.c.version == version)
            rows = (await conn.execute(query.limit(2))).all()
        if len(rows) != 1:
            return None
        return ConfigSnapshot.from_json(rows[0][0])

    async def history(self, limit: int = 50) -> list[dict[str, Any]]:
        """Applications newest first, each with its version's summary."""
        query = (
            select(config_events, config_versions.c.config_json, config_versions.c.policy_version)
            .join(config_versions, config_versions.c.version == config_events.c.version)
            .order_by(desc(config_events.c.id))
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in await conn.execute(query)]
        for row in rows:
            row["summary"] = ConfigSnapshot.from_json(row.pop("config_json")).summary()
        return rows


class Rollout:
    """The gateway's live config and the per-request rollout seams, for one `Services`."""

    def __init__(self, services: Services, pool: BackendPool | None, custom_backend: bool) -> None:
        self.services = services
        self.pool = pool
        self._custom_backend = custom_backend
        settings = services.settings
        self.shadow = ShadowRunner(services.audit, settings.shadow_max_in_flight, rails=lambda: services.rails)
        self.store = ConfigStore(services.engine)
        self.host = f"{socket.gethostname()}:{os.getpid()}"
        self.snapshot: ConfigSnapshot | None = None
        self.versions: Mapping[str, Any] = {"gateway_version": GATEWAY_VERSION}
        self._pinned_aliases, self._pinned_policy = self._pinned(settings)
        self._lock: asyncio.Lock | None = None
        self._poller: asyncio.Task[None] | None = None
        self._signal_installed = False
        self.reloads = 0
        self.failed_reloads = 0
        self.last_error: str | None = None
        self._retired: list[Backend] = []

    @staticmethod
    def _pinned(settings: Settings) -> tuple[tuple[tuple[str, ...], tuple[str, ...]], Path | None]:
        """What came from flags or the embedded default rather than the file, kept across reloads:
        (aliases before the file's, aliases after them), and a policy given by flag."""
        if settings.config is None:
            return ((), settings.alias), settings.policy
        try:
            from_file = load_settings({"config": settings.config})
        except SettingsError:
            return ((), settings.alias), settings.policy
        file_positions = [i for i, a in enumerate(settings.alias) if a in from_file.alias]
        first = file_positions[0] if file_positions else len(settings.alias)
        pinned = [(i, a) for i, a in enumerate(settings.alias) if a not in from_file.alias]
        before = tuple(a for i, a in pinned if i < first)
        after = tuple(a for i, a in pinned if i >= first)
        policy = settings.policy if settings.policy != from_file.policy else None
        return (before, after), policy

    # -- start, stop -------------------------------------------------------------------------

    async def start(self) -> None:
        """Store the config this replica started with, follow the live one, watch for changes."""
        self._lock = asyncio.Lock()
        snapshot = snapshot_of(self.services.settings)
        self._install(snapshot)
        if await self.store.known(snapshot.version):
            live = await self.store.live()
            if live is not None and live != snapshot.version:
                await self._follow(live)
        else:
            await self.store.publish(snapshot, "start", self.host)
        self._poller = asyncio.create_task(self._poll(), name="config-poll")
        self._install_sighup()

    def _install_sighup(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload_logged()))
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread (tests), or no SIGHUP
            return
        self._signal_installed = True

    async def _reload_logged(self) -> None:
        try:
            result = await self.reload()
        except ConfigInvalid:
            return  # logged by reload
        log.warning("SIGHUP: config %s applied (%s)", result["version"], result["summary"])

    async def stop(self) -> None:
        if self._signal_installed:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await self.shadow.stop()
        if self.pool is not None:  # every client, also those of deployments a reload removed
            await self.pool.aclose()

    # -- reload, follow, apply ---------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Read the files again and apply them; ConfigInvalid (running config kept) says why not."""
        assert self._lock is not None
        async with self._lock:
            try:
                snapshot = read_config(self.services.settings, self._pinned_aliases, self._pinned_policy)
                changed = await self._apply(snapshot)
            except ConfigInvalid as exc:
                self.failed_reloads += 1
                self.last_error = str(exc)
                log.error("config reload rejected, the running config %s stays: %s", self.version, exc)
                raise
            await self.store.publish(snapshot, "reload", self.host)
            self.reloads += 1
            self.last_error = None
        log.warning("config %s applied by reload (%s)", snapshot.version, snapshot.summary())
        return {"version": snapshot.version, "changed": changed, "summary": snapshot.summary()}

    async def _follow(self, version: str) -> None:
        """Apply a version another replica (or a rollback) made live."""
        stored = await self.store.get(version)
        if stored is None:
            log.error("live config %s is not stored; keeping %s", version, self.version)
            return
        try:
            await self._apply(stored)
        except ConfigInvalid as exc:
            self.last_error = f"live config {version} cannot be applied here: {exc}"
            log.error("%s; keeping %s", self.last_error, self.version)
            return
        log.warning("config %s applied from the database (%s)", version, stored.summary())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.services.settings.config_poll)
            try:
                live = await self.store.live()
                if live is not None and live != self.version and self._lock is not None:
                    async with self._lock:
                        # Read again under the lock: a reload that held it may have published a
                        # newer version since, and following the one read before would undo it.
                        live = await self.store.live()
                        if live is not None and live != self.version:
                            await self._follow(live)
            except Exception:  # the database may be down for a while: try again next time
                log.warning("config poll failed", exc_info=True)

    @property
    def version(self) -> str | None:
        return self.snapshot.version if self.snapshot is not None else None

    def _install(self, snapshot: ConfigSnapshot) -> None:
        self.snapshot = snapshot
        self.versions = {
            "config_version": snapshot.version,
            "policy_version": snapshot.policy_version,
            "gateway_version": GATEWAY_VERSION,
        }

    async def _apply(self, snapshot: ConfigSnapshot) -> bool:
        """Build what `snapshot` needs, then swap it in at once. False: it was live already."""
        if snapshot.version == self.version:
            return False
        services = self.services
        try:
            policy = snapshot.policy()
        except PolicyError as exc:
            raise ConfigInvalid(f"invalid policy: {exc}") from None
        rails = services.rails
        if self.snapshot is None or snapshot.policy_version != self.snapshot.policy_version:
            try:
                rails = await services.load_guardrails(policy)  # shares the embedder's MiniLM, as at start
            except Exception as exc:  # a term file gone, a scorer that will not load
                raise ConfigInvalid(f"policy {snapshot.policy_source}: {exc}") from None
        backend = await self._backend_for(snapshot)
        old_backend = services.backend
        services.settings = services.settings.replace(
            deployments=snapshot.deployments,
            alias=snapshot.aliases,
            sticky=snapshot.sticky,
            policy=Path(snapshot.policy_source) if snapshot.policy_source else None,
        )
        if isinstance(backend, DeploymentRouter):
            backend.sticky = snapshot.sticky
        services.policy, services.rails, services.backend = policy, rails, backend
        services.pipeline = services._build_pipeline()
        self._install(snapshot)
        if backend is not old_backend:
            self._retire(old_backend)
            if isinstance(backend, Router | DeploymentRouter):
                backend.start()
        return True

    async def _backend_for(self, snapshot: ConfigSnapshot) -> Backend:
        services = self.services
        if self.pool is None or (self._custom_backend and not snapshot.deployments):
            if snapshot.deployments:
                raise ConfigInvalid("this gateway was given its backend in code; deployments cannot be loaded")
            return services.backend
        if not snapshot.deployments and not services.settings.backend:
            raise ConfigInvalid("no deployments and no backend: nothing would serve requests")
        if snapshot.deployments == services.settings.deployments and self.snapshot is not None:
            return services.backend
        if snapshot.deployments:
            router: Router | DeploymentRouter = build_router(
                snapshot.deployments, self.pool, services.settings.backend, snapshot.sticky
            )
        else:
            router = self.pool.router(services.settings.backend)
        await router.refresh()
        return router

    def _retire(self, backend: Backend) -> None:
        """Stop the old router's health watch; its clients live on in the pool (shared with the new one)."""
        if isinstance(backend, Router | DeploymentRouter):
            task = asyncio.get_running_loop().create_task(backend.stop_watching())
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    # -- per request -------------------------------------------------------------------------

    def begin(self, key: KeyInfo, body: Mapping[str, Any]) -> RouteContext:
        """The request's route: its sticky id, and a deployment an admin forced (anyone else: 403)."""
        pending = ROUTE.get()
        forced = pending.forced if pending is not None and not pending.used else None
        if forced is not None and key.role != "admin":
            raise PermissionDenied(
                f"only an admin key may choose a deployment with {DEPLOYMENT_HEADER}",
                param=DEPLOYMENT_HEADER,
                code="deployment_forbidden",
            )
        sticky = self.services.settings.sticky
        sticky_id: str | None = None
        if sticky == "key":
            sticky_id = key.id
        elif sticky == "user" and isinstance(body.get("user"), str):
            sticky_id = body["user"]
        return begin_route(sticky_id, forced)

    def after_send(self, trace: Any, body: Mapping[str, Any]) -> None:
        """Launch the request's shadow copies (chosen by the router), off the client's path."""
        route: RouteContext | None = getattr(trace, "route", None) or ROUTE.get()
        backend = self.services.backend
        if route is None or not route.shadows or not isinstance(backend, DeploymentRouter) or not trace.model:
            return
        targets = backend.shadow_targets(trace.model, route)
        if targets:
            self.shadow.launch(self._source(trace, body), targets)

    def _source(self, trace: Any, body: Mapping[str, Any]) -> ShadowSource:
        from gateway import guarding, rag

        endpoint = trace.endpoint
        messages = guarding.checked_messages(endpoint.shape, dict(body))
        return ShadowSource(
            request_id=trace.request_id,
            endpoint=endpoint.name,
            path=endpoint.path,
            chat=endpoint.chat,
            model=trace.model,
            api_key_id=trace.api_key_id,
            body=dict(body),
            passages=tuple(rag.as_passage(h) for h in trace.hits),
            prompt=guarding.last_user_text(messages),
            trace_id=trace.trace_id,
            versions={**trace.versions, **index_versions(trace)},
        )

    def collect(self) -> Iterator[Metric]:
        """Prometheus families read at scrape time (gateway.metrics): shadow copies, config version, reloads."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        copies = CounterMetricFamily(
            "gateway_shadow_copies", "Shadow copies by deployment and outcome (sent, dropped over the bound, "
            "failed, completed).", labels=["deployment", "outcome"],
        )  # fmt: skip
        for name, stats in self.shadow.stats.items():
            for outcome, count in _counts(stats).items():
                copies.add_metric([name, outcome], count)
        yield copies
        yield GaugeMetricFamily("gateway_shadow_in_flight", "Shadow copies in flight.", value=self.shadow.in_flight)
        info = GaugeMetricFamily(
            "gateway_config_info",
            "The live config (value 1).",
            labels=["config_version", "policy_version", "gateway_version"],
        )
        if self.snapshot is not None:
            info.add_metric([self.snapshot.version, self.snapshot.policy_version, GATEWAY_VERSION], 1.0)
        yield info
        reloads = CounterMetricFamily("gateway_config_reloads", "Config reloads by result.", labels=["result"])
        reloads.add_metric(["applied"], self.reloads)
        reloads.add_metric(["rejected"], self.failed_reloads)
        yield reloads

    def describe(self) -> dict[str, Any]:
        """For `/readyz` (admins) and the admin API."""
        snapshot = self.snapshot
        return {
            "config_version": self.version,
            "policy_version": snapshot.policy_version if snapshot else None,
            "gateway_version": GATEWAY_VERSION,
            "deployments": deployment_table(snapshot.deployments) if snapshot else [],
            "sticky": snapshot.sticky if snapshot else None,
            "reloads": self.reloads,
            "failed_reloads": self.failed_reloads,
            "last_error": self.last_error,
            "shadow": {
                "in_flight": self.shadow.in_flight,
                "max_in_flight": self.shadow.max_in_flight,
                "by_deployment": {name: _counts(s) for name, s in self.shadow.stats.items()},
            },
        }


def sticky_id(authorization: str | None, services: Services) -> str | None:
    """With `sticky = "key"`: a stable id per API key (a digest of the credential; no lookup)."""
    if services.settings.sticky != "key" or not authorization:
        return None
    return hashlib.blake2b(authorization.encode("utf-8", "replace"), digest_size=12).hexdigest()


def _counts(stats: Any) -> dict[str, int]:
    return {name: getattr(stats, name) for name in ("sent", "dropped", "failed", "completed")}


def index_versions(trace: Any) -> dict[str, Any]:
    """`index_versions` for the audit row: the version of the collection the request searched."""
    retrieval = getattr(trace, "retrieval", None)
    if not retrieval or not retrieval.get("index_version"):
        return {}
    return {"index_versions": _encode({retrieval["collection"]: retrieval["index_version"]}).decode()}


def audit_columns(trace: Any) -> dict[str, Any]:
    """The rollout columns of a primary request's audit row (the pipeline's `Trace.row`)."""
    route: RouteContext | None = getattr(trace, "route", None)
    columns: dict[str, Any] = {**trace.versions, **index_versions(trace)}
    if route is not None and route.deployment is not None:
        columns["deployment"] = route.deployment
        columns["backend_model"] = route.backend_model
    return columns
