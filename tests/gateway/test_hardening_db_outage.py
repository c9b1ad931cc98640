"""A database outage longer than the key cache: keys seen before keep working from their last known
state, a key never seen is a 503 in OpenAI's format, and every request still leaves one audit row."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.auth import KeyDatabaseUnavailable, KeyStore
from gateway.db import create_engine
from gateway.errors import AuthenticationFailed
from gateway.migrate import upgrade
from gateway.settings import Settings
from serving.fake import FakeBackendThread
from tests.helpers import PG_ADMIN, GatewayServer, audit_rows, create_key, pg_admin, throwaway_postgres


async def test_keys_are_served_from_their_last_known_state_while_the_database_is_down(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    url = f"sqlite:///{path}"
    await asyncio.to_thread(upgrade, url)
    engine = create_engine(url)
    store = KeyStore(engine, cache_ttl_s=0.0, retry_s=0.0)  # every use is past its cache time
    known, known_secret = await store.create("client", "known")
    _, unseen_secret = await store.create("client", "never used before the outage")
    assert (await store.authenticate("Bearer " + known_secret)).id == known.id
    with pytest.raises(AuthenticationFailed):
        await store.authenticate("Bearer sk-gw-wrong")
    await engine.dispose()
    path.rename(tmp_path / "elsewhere.db")  # the next connection finds no tables: the database is gone
    try:
        assert (await store.authenticate("Bearer " + known_secret)).id == known.id
        with pytest.raises(AuthenticationFailed):  # known to be wrong: still 401
            await store.authenticate("Bearer sk-gw-wrong")
        with pytest.raises(KeyDatabaseUnavailable) as unavailable:
            await store.authenticate("Bearer " + unseen_secret)
        assert unavailable.value.status == 503 and unavailable.value.body()["error"]["code"] == "database_unavailable"
    finally:
        await engine.dispose()
        (tmp_path / "elsewhere.db").rename(path)
    # Back: a revocation made elsewhere (the CLI) applies, and the unseen key works.
    other = create_engine(url)
    assert await KeyStore(other).revoke(known.id)
    await other.dispose()
    with pytest.raises(AuthenticationFailed):
        await store.authenticate("Bearer " + known_secret)
    assert (await store.authenticate("Bearer " + unseen_secret)).name == "never used before the outage"
    await engine.dispose()


def admin(*statements: str) -> None:
    pg_admin(*statements)


@pytest.fixture
def outage_db() -> Iterator[str]:
    """A throw-away PostgreSQL database of its own (this test takes it down)."""
    with throwaway_postgres("gw_outage") as name:
        upgrade(f"{PG_ADMIN}/{name}")
        yield name


def take_down(name: str) -> None:
    admin(
        f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false',
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()",
    )


@pytest.mark.postgres
def test_a_postgres_outage_longer_than_the_key_cache_gives_no_500_and_loses_no_audit_row(
    tmp_path: Path, fake_backend: FakeBackendThread, outage_db: str
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        backend=(fake_backend.url,),
        database=f"{PG_ADMIN}/{outage_db}",
        embedding_model="hashing",
        sample_corpus=False,
        audit_db_wait=0.5,
    )
    known_id, known = create_key(settings, "client", "known")
    _, never_seen = create_key(settings, "client", "never seen")
    answers: list[httpx.Response] = []
    with GatewayServer(settings) as gw, httpx.Client(base_url=gw.url, timeout=60) as http:
        gw.services.keys.cache_ttl_s = 0.0  # the outage outlasts the key cache from its first request
        gw.services.keys.retry_s = 0.0  # and every request asks the database again

        def call(key: str, *, stream: bool = False) -> httpx.Response:
            body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
            answer = http.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
            answers.append(answer)
            return answer

        assert call(known).status_code == 200
        assert call("sk-gw-wrong").status_code == 401
        take_down(outage_db)
        try:
            during = [call(known) for _ in range(6)] + [call(known, stream=True)]
            unseen = call(never_seen)
            wrong = call("sk-gw-wrong")
        finally:
            admin(f'ALTER DATABASE "{outage_db}" ALLOW_CONNECTIONS true')
        assert [a.status_code for a in during] == [200] * 7
        assert "data: [DONE]" in during[-1].text
        assert unseen.status_code == 503 and unseen.json()["error"]["code"] == "database_unavailable"
        assert unseen.json()["error"]["type"] == "server_error"
        assert wrong.status_code == 401
        # Back: the revocation (made through the database, like the CLI) applies at once.
        create_engine_and_revoke(settings, known_id)
        assert call(known).status_code == 401
        assert call(never_seen).status_code == 200
    # The server has stopped: its audit writer replayed the spool on the way.
    assert all(a.status_code in (200, 401, 503) for a in answers)
    ids = [a.headers["x-gateway-request-id"] for a in answers]
    rows = audit_rows(settings)
    assert sorted(r["request_id"] for r in rows) == sorted(ids)  # one row per request, none lost
    assert not (tmp_path / "audit-spool.jsonl").exists()
    statuses = {r["request_id"]: (r["http_status"], r["error_code"]) for r in rows}
    assert statuses[unseen.headers["x-gateway-request-id"]] == (503, "database_unavailable")


def create_engine_and_revoke(settings: Settings, key_id: str) -> None:
    async def go() -> None:
        engine = create_engine(settings.database_url)
        try:
            assert await KeyStore(engine).revoke(key_id)
        finally:
            await engine.dispose()

    asyncio.run(go())
