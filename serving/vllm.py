"""The vLLM backend: an OpenAI-compatible HTTP client built on one shared aiohttp session.

The same client talks to vLLM on a GPU, to the local CPU build and to the fake backend: they
all speak OpenAI's protocol, so nothing here is specific to one of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec

from serving.backend import Backend, ModelCard
from serving.errors import BackendHTTPError, BackendTimeout, BackendUnavailable

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
_JSON = {"content-type": "application/json"}
_DONE = b"[DONE]"


def _error_message(body: object, status: int) -> str:
    """Pull the human message out of an OpenAI-style (or older vLLM-style) error body."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return str(body["message"])
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return f"HTTP {status}"


class VLLMBackend(Backend):
    """A vLLM server (or anything OpenAI-compatible) at `base_url`."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        max_connections: int = 1024,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[: -len("/v1")]
        self.name = self.base_url
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        self._max_connections = max_connections
        self._headers = dict(_JSON)
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily so the session binds to the running loop, once per backend.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )
        return self._session

    async def _raise_for_status(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        raw = await resp.read()
        try:
            body: object = _decode(raw)
        except msgspec.DecodeError:
            body = raw.decode("utf-8", "replace")
        raise BackendHTTPError(_error_message(body, resp.status), backend=self.name, status=resp.status, body=body)

    async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with self._client().post(self.base_url + path, data=_encode(body), headers=self._headers) as resp:
                await self._raise_for_status(resp)
                raw = await resp.read()
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise BackendTimeout(f"backend {self.name} timed out", backend=self.name) from exc
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"backend {self.name} is unreachable: {exc}", backend=self.name) from exc
        try:
            decoded: dict[str, Any] = _decode(raw)
        except msgspec.DecodeError as exc:
            raise BackendHTTPError(
                f"backend {self.name} sent invalid JSON", backend=self.name, status=502, body=raw[:500]
            ) from exc
        return decoded

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        url = self.base_url + path
        try:
            resp = await self._client().post(url, data=_encode(body), headers=self._headers)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise BackendTimeout(f"backend {self.name} timed out", backend=self.name) from exc
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"backend {self.name} is unreachable: {exc}", backend=self.name) from exc
        finished = False
        try:
            await self._raise_for_status(resp)
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                # SSE events end with a blank line; vLLM sends one `data:` line per event.
                while True:
                    end = buffer.find(b"\n\n")
                    if end < 0:
                        break
                    event, buffer = buffer[:end], buffer[end + 2 :]
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == _DONE:
                            finished = True
                            return
                        yield payload
            finished = True
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise BackendTimeout(f"backend {self.name} stopped streaming", backend=self.name) from exc
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"backend {self.name} dropped the stream: {exc}", backend=self.name) from exc
        finally:
            if finished:
                resp.release()
            else:
                # The consumer went away (or an error): drop the connection so vLLM aborts.
                resp.close()

    async def models(self) -> list[ModelCard]:
        try:
            async with self._client().get(self.base_url + "/v1/models") as resp:
                await self._raise_for_status(resp)
                data = _decode(await resp.read())
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise BackendTimeout(f"backend {self.name} timed out", backend=self.name) from exc
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"backend {self.name} is unreachable: {exc}", backend=self.name) from exc
        return [
            ModelCard(id=m["id"], owned_by=m.get("owned_by", "vllm"), max_model_len=m.get("max_model_len"))
            for m in data.get("data", [])
        ]

    async def health(self) -> bool:
        try:
            async with self._client().get(self.base_url + "/health", timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
