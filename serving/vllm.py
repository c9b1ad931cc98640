"""The vLLM backend: an OpenAI-compatible HTTP client over the gateway's lean keep-alive pool.

The same client talks to vLLM on a GPU, to the local CPU build and to the fake backend: they
all speak OpenAI's protocol, so nothing here is specific to one of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from serving.backend import Backend, ModelCard
from serving.errors import BackendHTTPError, BackendTimeout, BackendUnavailable, ServingError
from serving.httpclient import ConnectError, HTTPError, HTTPPool, ReadTimeout, Response

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
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
        api_key: str | None = None,
    ) -> None:
        url = base_url.rstrip("/")
        if url.endswith("/v1"):
            url = url[: -len("/v1")]
        self.base_url = url
        self.name = url
        self._pool = HTTPPool(url, connect_timeout=connect_timeout, read_timeout=read_timeout)
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        self._health_path = "/health"

    def _translate(self, exc: HTTPError, what: str) -> ServingError:
        if isinstance(exc, ReadTimeout):
            return BackendTimeout(f"backend {self.name} timed out {what}", backend=self.name)
        if isinstance(exc, ConnectError):
            return BackendUnavailable(f"backend {self.name} is unreachable: {exc}", backend=self.name)
        return BackendUnavailable(f"backend {self.name} failed {what}: {exc}", backend=self.name)

    async def _send(self, method: str, path: str, body: bytes | None, idle_timeout: float | None = -1.0) -> Response:
        try:
            return await self._pool.request(method, path, body, self._headers, idle_timeout)
        except HTTPError as exc:
            raise self._translate(exc, "before answering") from exc

    async def _read(self, resp: Response) -> bytes:
        try:
            return await resp.read()
        except HTTPError as exc:
            raise self._translate(exc, "while answering") from exc

    async def _check(self, resp: Response) -> None:
        if resp.status < 400:
            return
        raw = await self._read(resp)
        try:
            body: object = _decode(raw)
        except msgspec.DecodeError:
            body = raw.decode("utf-8", "replace")
        raise BackendHTTPError(_error_message(body, resp.status), backend=self.name, status=resp.status, body=body)

    async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = await self._send("POST", path, _encode(body))
        await self._check(resp)
        raw = await self._read(resp)
        try:
            decoded: dict[str, Any] = _decode(raw)
        except msgspec.DecodeError as exc:
            raise BackendHTTPError(
                f"backend {self.name} sent invalid JSON", backend=self.name, status=502, body=raw[:500]
            ) from exc
        return decoded

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        resp = await self._send("POST", path, _encode(body))
        try:
            await self._check(resp)
            buffer = b""
            try:
                async for chunk in resp.iter_chunks():
                    buffer = buffer + chunk if buffer else chunk
                    # SSE events end with a blank line; vLLM sends one `data:` line per event.
                    end = buffer.rfind(b"\n\n")
                    if end < 0:
                        continue
                    complete, buffer = buffer[:end], buffer[end + 2 :]
                    batch: list[bytes] = []
                    for line in complete.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == _DONE:
                            if batch:
                                yield batch
                            return
                        batch.append(payload)
                    if batch:
                        yield batch
            except HTTPError as exc:
                raise self._translate(exc, "mid-stream") from exc
        finally:
            # Normal end: the connection goes back to the pool. Abandoned (the client left) or
            # failed: the connection is closed, so vLLM sees the disconnect and aborts.
            resp.close()

    async def models(self) -> list[ModelCard]:
        resp = await self._send("GET", "/v1/models", None)
        await self._check(resp)
        data = _decode(await self._read(resp))
        return [
            ModelCard(id=m["id"], owned_by=m.get("owned_by", "vllm"), max_model_len=m.get("max_model_len"))
            for m in data.get("data", [])
        ]

    async def health(self) -> bool:
        """vLLM's `/health`; a server without that route (404/405) is probed through `/v1/models` from then on."""
        status = await self._probe(self._health_path)
        if status in (404, 405) and self._health_path == "/health":
            self._health_path = "/v1/models"  # any OpenAI-compatible server lists its models
            status = await self._probe(self._health_path)
        return status == 200

    async def _probe(self, path: str) -> int | None:
        try:
            resp = await self._pool.request("GET", path, None, self._headers, idle_timeout=2.0)
            await resp.read()
        except HTTPError:
            return None
        return resp.status

    async def aclose(self) -> None:
        await self._pool.close()
