"""Three `gateway serve` processes on one PostgreSQL database and one Redis (issue 11): a rate limit
holds across them, a document ingested by a separate process is cited by all of them, one
SIGKILLed mid-load loses no accepted request's audit row, and a revoked key is refused by every
replica."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.bench_gateway import Proc, free_port, start_fake
from tests.gateway.test_limits import needs_redis
from tests.helpers import PG_ADMIN, pg_admin, throwaway_postgres

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = [sys.executable, "-m", "gateway.cli"]
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
pytestmark = [pytest.mark.postgres, pytest.mark.slow, needs_redis]


def _cli(env: dict[str, str], *args: str) -> tuple[str, str]:
    done = subprocess.run([*GATEWAY, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def _key(env: dict[str, str], *extra: str) -> tuple[str, str]:
    out, err = _cli(env, "keys", "create", "--role", "client", *extra)
    match = re.search(r"created key (\S+)", err)
    assert match, err
    return out.strip().splitlines()[0], match.group(1)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[dict[str, str], list[Proc], list[str]]]:
    fake, fake_url = start_fake(delay_ms=30)
    prefix = f"test3:{uuid.uuid4().hex}:"
    try:
        with throwaway_postgres("gw_three") as name:
            env = {
                "GATEWAY_DATABASE": f"{PG_ADMIN}/{name}",
                "GATEWAY_REDIS": "redis://127.0.0.1:6379/0",
                "GATEWAY_REDIS_PREFIX": prefix,
                "GATEWAY_LOG_LEVEL": "warning",
                "GATEWAY_EMBEDDING_MODEL": "hashing",
                "GATEWAY_SAMPLE_CORPUS": "false",
                "GATEWAY_DATA_DIR": str(tmp_path / "shared"),
                "GATEWAY_INDEX_STORAGE": str(tmp_path / "indexes"),  # the shared volume of a real deployment
            }
            (tmp_path / "indexes").mkdir()
            _cli(env, "db", "upgrade")
            replicas, urls = [], []
            try:
                for i in range(3):
                    port = free_port()
                    replica_env = {**env, "GATEWAY_DATA_DIR": str(tmp_path / f"replica{i}")}
                    args = [*GATEWAY, "serve", "--backend", fake_url, "--port", str(port),
                            "--policy", str(ROOT / "benchmarks" / "guards-off.toml")]  # fmt: skip
                    replicas.append(Proc(args, f"http://127.0.0.1:{port}/readyz", replica_env))
                    urls.append(f"http://127.0.0.1:{port}")
                yield env, replicas, urls
            finally:
                for replica in replicas:
                    _stop(replica)
    finally:
        _stop(fake)


def _stop(proc: Proc) -> None:
    if proc.process.poll() is None:
        proc.stop()
    if proc.process.stderr is not None:
        proc.process.stderr.close()


def _audit_ids(database: str) -> set[str]:
    name = database.rsplit("/", 1)[1]
    (rows,) = pg_admin("SELECT request_id FROM audit_records", database=name)
    return {r["request_id"] for r in rows}


def test_three_replicas_share_limits_keep_audit_rows_and_see_revocations(
    cluster: tuple[dict[str, str], list[Proc], list[str]],
) -> None:
    env, replicas, urls = cluster
    limited, _ = _key(env, "--rpm", "9")
    steady, steady_id = _key(env)

    # A rate limit across replicas: 18 requests spread over the three, exactly 9 admitted.
    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as http:
            replies = await asyncio.gather(*(
                http.post(urls[i % 3] + "/v1/chat/completions", json=CHAT,
                          headers={"authorization": f"Bearer {limited}"})
                for i in range(18)
            ))  # fmt: skip
        return [(r.status_code, r.text[:300]) for r in replies]

    answers = asyncio.run(burst())
    codes = [code for code, _ in answers]
    assert sorted(codes) == [200] * 9 + [429] * 9, answers

    # An ingest run by a separate process (a batch job, no gateway in it): every replica cites the
    # new document from the ingest's completion on (the bound the issue sets is 30 s).
    docs = Path(env["GATEWAY_INDEX_STORAGE"]).parent / "docs"
    docs.mkdir()
    (docs / "zorblat.md").write_text("# Zorblat\n\nThe Zorblat 3000 weighs 4.2 kg and costs 199 euros.\n")
    _cli(env, "ingest", str(docs), "--collection", "kb", "--no-progress")
    ingested = time.monotonic()
    ask = {**CHAT, "messages": [{"role": "user", "content": "How much does the Zorblat 3000 weigh?"}],
           "rag": {"collection": "kb", "min_score": 0.0}}  # fmt: skip
    for url in urls:
        while True:
            reply = httpx.post(url + "/v1/chat/completions", json=ask, headers={"authorization": f"Bearer {steady}"})
            cited = reply.status_code == 200 and [c["document"] for c in reply.json()["gateway"]["citations"]]
            if cited == ["zorblat.md"]:
                break
            assert time.monotonic() - ingested < 30, (url, reply.status_code, reply.text[:300])
            time.sleep(0.5)

    # SIGKILL one replica mid-load: every request it answered 200 has its audit row.
    async def load() -> list[str]:
        accepted: list[str] = []
        async with httpx.AsyncClient(timeout=30) as http:

            async def one() -> None:
                try:
                    reply = await http.post(urls[0] + "/v1/chat/completions", json=CHAT,
                                            headers={"authorization": f"Bearer {steady}"})  # fmt: skip
                except httpx.HTTPError:
                    return  # cut off by the kill: never accepted
                if reply.status_code == 200:
                    accepted.append(reply.headers["x-gateway-request-id"])

            async def killer() -> None:
                # Mid-load: once a few answers are out and the rest are in flight (a fixed 0.6 s was too
                # short on a loaded machine, where the first answers came later).
                deadline = time.monotonic() + 60
                while len(accepted) < 3 and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a plain list
                    await asyncio.sleep(0.01)
                os.kill(replicas[0].process.pid, signal.SIGKILL)

            await asyncio.gather(killer(), *(one() for _ in range(60)))
        return accepted

    accepted = asyncio.run(load())
    replicas[0].process.wait(10)
    assert accepted, "no request was answered before the kill"
    missing = set(accepted) - _audit_ids(env["GATEWAY_DATABASE"])
    assert not missing, f"{len(missing)} of {len(accepted)} answered requests have no audit row"

    # A revoked key: the two live replicas refuse it (each within its key cache time, 30 s).
    for url in urls[1:]:
        assert httpx.post(url + "/v1/chat/completions", json=CHAT,
                          headers={"authorization": f"Bearer {steady}"}, timeout=30).status_code == 200  # fmt: skip
    _cli(env, "keys", "revoke", steady_id)
    deadline = time.monotonic() + 40
    refused: set[str] = set()
    while refused != set(urls[1:]) and time.monotonic() < deadline:
        for url in set(urls[1:]) - refused:
            reply = httpx.post(url + "/v1/chat/completions", json=CHAT,
                               headers={"authorization": f"Bearer {steady}"}, timeout=30)  # fmt: skip
            if reply.status_code == 401:
                refused.add(url)
        time.sleep(0.5)
    assert refused == set(urls[1:])
