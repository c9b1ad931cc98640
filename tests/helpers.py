"""Test helpers: run the real gateway app under uvicorn on a loopback socket in a background thread."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import openai
import pytest
import uvicorn
from sqlalchemy import Table, insert, select

from gateway.app import create_app
from gateway.auth import KeyStore
from gateway.db import audit_records, create_engine
from gateway.migrate import upgrade
from gateway.services import Services
from gateway.settings import Settings


class GatewayServer:
    """`with GatewayServer(settings) as gw: gw.url` - the app as a user runs it, on an ephemeral port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.services: Services = self.app.state.services
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, loop="asyncio", http="httptools", log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._server.serve(sockets=[self._sock]))
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def __enter__(self) -> GatewayServer:
        self._thread.start()
        # Start-up loads models (MiniLM, the toxicity scorer) and may ingest the sample corpus:
        # seconds normally, longer on a machine busy with vLLM.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self._server.started:
                return self
            if not self._thread.is_alive():
                raise RuntimeError("the gateway failed to start")
            threading.Event().wait(0.02)
        raise RuntimeError("the gateway did not start in 180 s")

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(15)
        self._sock.close()


async def insert_rows(url: str, table: Table, rows: list[dict[str, Any]]) -> None:
    """Rows straight into a table of the database at `url` (one transaction, an engine of its own)."""
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(table), rows)
    finally:
        await engine.dispose()


def prepare_database(settings: Settings) -> None:
    upgrade(settings.database_url)


def create_key(settings: Settings, role: str = "client", name: str | None = None) -> tuple[str, str]:
    """Create a key directly in the database; returns (key id, secret)."""

    async def go() -> tuple[str, str]:
        engine = create_engine(settings.database_url)
        try:
            info, secret = await KeyStore(engine).create(role, name)
            return info.id, secret
        finally:
            await engine.dispose()

    return asyncio.run(go())


def audit_rows(settings: Settings, **where: Any) -> list[dict[str, Any]]:
    """Read audit rows (optionally filtered by column equality), oldest first."""

    async def go() -> list[dict[str, Any]]:
        engine = create_engine(settings.database_url)
        try:
            query = select(audit_records).order_by(audit_records.c.id)
            for column, value in where.items():
                query = query.where(audit_records.c[column] == value)
            async with engine.connect() as conn:
                return [dict(row._mapping) for row in await conn.execute(query)]
        finally:
            await engine.dispose()

    return asyncio.run(go())


@contextmanager
def serving(settings: Settings, key: str | None = None) -> Iterator[tuple[GatewayServer, openai.OpenAI]]:
    """A running gateway and a stock OpenAI client for it (a new client key unless one is given).

    The client never retries, so every failure shows."""
    if key is None:
        _, key = create_key(settings)
    with (
        GatewayServer(settings) as gateway,
        openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=120) as client,
    ):
        yield gateway, client


PG_ADMIN = os.environ.get("GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def pg_admin(*statements: str, database: str = "postgres") -> list[list[asyncpg.Record]]:
    """Run statements on the test PostgreSQL server (one connection), returning each one's rows."""

    async def run() -> list[list[asyncpg.Record]]:
        conn = await asyncpg.connect(f"{PG_ADMIN}/{database}")
        try:
            return [await conn.fetch(sql) for sql in statements]
        finally:
            await conn.close()

    return asyncio.run(run())


@contextmanager
def throwaway_postgres(prefix: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database of the test's own (its name), dropped afterwards.

    Skips the test where no server answers. The drop first lets connections in again, so a test
    may take the database down (`ALLOW_CONNECTIONS false`) and leave it so."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        pg_admin(f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL at {PG_ADMIN} is not available: {exc}")
    try:
        yield name
    finally:
        pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true', f'DROP DATABASE "{name}" WITH (FORCE)')
