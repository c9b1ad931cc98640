"""The router follows backends that come and go, and a model no backend serves is a model miss.

Also: a backend without vLLM's `/health` (any OpenAI-compatible server) is judged healthy by its
`/v1/models`, so a readiness probe in front of it can pass.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from serving.errors import BackendHTTPError, NoBackendForModel
from serving.fake import FakeBackend, FakeBackendThread, FakeConfig
from serving.router import Router
from serving.vllm import VLLMBackend


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def plain_server() -> AsyncIterator[str]:
    """An OpenAI-compatible server without `/health`: the fake's own handlers, minus that route."""
    fake = FakeBackend(FakeConfig(models=("plain-model",)))
    app = web.Application()
    app.add_routes([web.get("/v1/models", fake._models), web.post("/v1/chat/completions", fake._chat)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_a_backend_without_a_health_route_is_healthy_through_its_model_list() -> None:
    async with plain_server() as url:
        backend = VLLMBackend(url)
        try:
            assert await backend.health() is True
            assert await backend.health() is True  # remembered: straight to /v1/models from now on
            answer = await backend.complete(
                "/v1/chat/completions", {"model": "plain-model", "messages": [{"role": "user", "content": "hi"}]}
            )
            assert answer["choices"][0]["message"]["content"]
        finally:
            await backend.aclose()


async def test_a_backend_that_is_down_is_unhealthy_and_not_judged_by_its_model_list() -> None:
    backend = VLLMBackend(f"http://127.0.0.1:{free_port()}", connect_timeout=1)
    try:
        assert await backend.health() is False
    finally:
        await backend.aclose()


async def test_a_backend_that_comes_up_later_is_seen_within_seconds() -> None:
    port = free_port()  # nothing listens there yet
    router = Router(
        [VLLMBackend(f"http://127.0.0.1:{port}", connect_timeout=1)], refresh_s=3600.0, recheck_s=(0.05, 0.1)
    )
    try:
        await router.refresh()
        router.start()
        assert await router.health_by_backend() == {f"http://127.0.0.1:{port}": False}
        assert await router.models() == []
        with FakeBackendThread(FakeConfig(models=("late-model",)), port=port):
            # The watcher re-probes a down backend every 1-2 s (here 0.05-0.1 s) and loads its
            # models when it turns healthy; the old router waited for the next 30 s refresh.
            for _ in range(200):
                if [m.id for m in await router.models()] == ["late-model"]:
                    break
                await asyncio.sleep(0.05)
            assert [m.id for m in await router.models()] == ["late-model"]
    finally:
        await router.aclose()


async def test_a_readiness_probe_loads_the_models_of_a_backend_that_just_came_up() -> None:
    port = free_port()
    router = Router([VLLMBackend(f"http://127.0.0.1:{port}", connect_timeout=1)], refresh_s=3600.0)
    try:
        await router.refresh()
        assert await router.models() == []
        with FakeBackendThread(FakeConfig(models=("late-model",)), port=port):
            # No watcher running, no waiting: the probe itself sees the turn and loads the list.
            assert await router.health_by_backend() == {f"http://127.0.0.1:{port}": True}
            assert [m.id for m in await router.models()] == ["late-model"]
    finally:
        await router.aclose()


async def test_an_unknown_model_is_a_model_miss_even_before_the_model_map_is_known() -> None:
    with FakeBackendThread(FakeConfig(models=("fake-model",))) as fake:
        router = Router([VLLMBackend(fake.url)])  # no refresh: the model map is still unknown
        body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
        try:
            with pytest.raises(NoBackendForModel):
                await router.complete("/v1/chat/completions", body)
            with pytest.raises(NoBackendForModel):
                async for _ in router.stream("/v1/chat/completions", {**body, "stream": True}):
                    pass
        finally:
            await router.aclose()


async def test_a_model_miss_on_one_backend_fails_over_to_the_one_that_serves_it() -> None:
    with (
        FakeBackendThread(FakeConfig(models=("a-model",))) as a,
        FakeBackendThread(FakeConfig(models=("b-model",))) as b,
    ):
        router = Router([VLLMBackend(a.url), VLLMBackend(b.url)])  # map unknown: both are candidates
        try:
            answer = await router.complete(
                "/v1/chat/completions", {"model": "b-model", "messages": [{"role": "user", "content": "hi"}]}
            )
            assert answer["model"] == "b-model"
        finally:
            await router.aclose()


async def test_a_404_for_a_model_the_backend_lists_is_passed_on() -> None:
    """The backend serves the model and still says 404 (a route it lacks): its answer, not a model miss."""
    with FakeBackendThread(FakeConfig(models=("fake-model",))) as fake:
        router = Router([VLLMBackend(fake.url)])
        try:
            await router.refresh()
            with pytest.raises(BackendHTTPError) as caught:
                await router.complete("/v1/no-such-route", {"model": "fake-model", "prompt": "hi"})
            assert caught.value.status == 404
        finally:
            await router.aclose()
