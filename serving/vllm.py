"""The vLLM backend: an OpenAI-compatible HTTP client over the gateway's lean keep-alive pool.

The same client talks to vLLM on a GPU, to the local CPU build and to the fake backend: they
all speak OpenAI's protocol, so nothing here is specific to one of them.

What a backend sends is bounded: `max_answer_bytes` caps an answer (a JSON body, or all the
bytes of a stream), `total_timeout` caps the whole exchange, and a stream must end with
`[DONE]`; anything else is a `BackendBadAnswer` or a `BackendTimeout`, never a hang, an
unbounded buffer or an answer that silently looks complete.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from serving.backend import REQUEST_HEADERS, Backend, ModelCard
from serving.errors import BackendBadAnswer, BackendHTTPError, BackendTimeout, BackendUnavailable, ServingError
from serving.httpclient import (
    BodyTooLarge,
    ConnectError,
    DeadlineExceeded,
    HTTPError,
    HTTPPool,
    ReadTimeout,
    Response,
)

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
_DONE = b"[DONE]"
_UNDECODABLE = (msgspec.DecodeError, RecursionError, UnicodeDecodeError)  # what a hostile JSON body raises
MAX_ANSWER_BYTES = 16 * 1024 * 1024


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


def _events(complete: bytes) -> tuple[list[bytes], bool]:
    """The `data:` payloads of complete SSE events, and whether `[DONE]` was among them."""
    batch: list[bytes] = []
    for line in complete.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == _DONE:
            return batch, True
        batch.append(payload)
    return batch, False


class VLLMBackend(Backend):
    """A vLLM server (or anything OpenAI-compatible) at `base_url`."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        total_timeout: float | None = 600.0,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        api_key: str | None = None,
        max_connections: int = 100,
    ) -> None:
        url = base_url.rstrip("/")
        if url.endswith("/v1"):
            url = url[: -len("/v1")]
        self.base_url = url
        self.name = url
        self._pool = HTTPPool(
            url, connect_timeout=connect_timeout, read_timeout=read_timeout, max_connections=max_connections
        )
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        self._total_timeout = total_timeout
        self._max_answer_bytes = max_answer_bytes
        self._health_path = "/health"

    def _translate(self, exc: HTTPError, what: str) -> ServingError:
        if isinstance(exc, DeadlineExceeded):
            return BackendTimeout(
                f"backend {self.name} did not finish within the total limit of {self._total_timeout:g} s",
                backend=self.name,
            )
        if isinstance(exc, BodyTooLarge):
            return self._too_large()
        if isinstance(exc, ReadTimeout):
            return BackendTimeout(f"backend {self.name} timed out {what}", backend=self.name)
        if isinstance(exc, ConnectError):
            return BackendUnavailable(f"backend {self.name} is unreachable: {exc}", backend=self.name)
        return BackendUnavailable(f"backend {self.name} failed {what}: {exc}", backend=self.name)

    def _too_large(self) -> BackendBadAnswer:
        return BackendBadAnswer(
            f"backend {self.name} sent an answer larger than the limit of {self._max_answer_bytes} bytes",
            backend=self.name,
            code="backend_answer_too_large",
        )

    def _deadline(self) -> float | None:
        if self._total_timeout is None:
            return None
        return asyncio.get_running_loop().time() + self._total_timeout

    async def _send(
        self,
        method: str,
        path: str,
        body: bytes | None,
        idle_timeout: float | None = -1.0,
        deadline: float | None = None,
    ) -> Response:
        headers = self._headers
        extra = REQUEST_HEADERS.get()
        if extra:  # the caller's trace context, passed on
            headers = {**headers, **extra} if headers else dict(extra)
        try:
            return await self._pool.request(method, path, body, headers, idle_timeout, deadline)
        except HTTPError as exc:
            raise self._translate(exc, "before answering") from exc

    async def _read(self, resp: Response) -> bytes:
        try:
            return await resp.read(self._max_answer_bytes)
        except HTTPError as exc:
            raise self._translate(exc, "while answering") from exc

    async def _check(self, resp: Response) -> None:
        if 200 <= resp.status < 300:
            return
        raw = await self._read(resp)
        try:
            body: object = _decode(raw)
        except _UNDECODABLE:
            body = raw.decode("utf-8", "replace")
        raise BackendHTTPError(_error_message(body, resp.status), backend=self.name, status=resp.status, body=body)

    async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = await self._send("POST", path, _encode(body), deadline=self._deadline())
        await self._check(resp)
        raw = await self._read(resp)
        try:
            decoded = _decode(raw)
        except _UNDECODABLE as exc:
            raise BackendBadAnswer(
                f"backend {self.name} sent invalid JSON", backend=self.name, code="backend_invalid_answer"
            ) from exc
        if not isinstance(decoded, dict):
            raise BackendBadAnswer(
                f"backend {self.name} answered with a JSON {type(decoded).__name__}, not an object",
                backend=self.name,
                code="backend_invalid_answer",
            )
        return decoded

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        resp = await self._send("POST", path, _encode(body), deadline=self._deadline())
        try:
            await self._check(resp)
            # SSE events end with a blank line; vLLM sends one `data:` line per event. Only the
            # new bytes are searched for the separator: bytes of an unfinished event wait in
            # `pending` and are joined once, when the event completes (linear in the answer).
            pending: list[bytes] = []
            received = 0
            limit = self._max_answer_bytes
            try:
                async for chunk in resp.iter_chunks():
                    received += len(chunk)
                    if received > limit:
                        raise self._too_large()
                    end = chunk.rfind(b"\n\n")
                    if end >= 0:
                        complete = b"".join((*pending, chunk[:end])) if pending else chunk[:end]
                        rest = chunk[end + 2 :]
                    elif pending and chunk[:1] == b"\n" and pending[-1][-1:] == b"\n":
                        complete, rest = b"".join(pending), chunk[1:]  # the blank line straddles two chunks
                    else:
                        if chunk:
                            pending.append(chunk)
                        continue
                    pending = [rest] if rest else []
                    batch, done = _events(complete)
                    if batch:
                        yield batch
                    if done:
                        return
            except HTTPError as exc:
                raise self._translate(exc, "mid-stream") from exc
            # The body ended: a last event without its blank line still counts, but a stream
            # without `[DONE]` was cut short, and must not pass for a complete answer.
            batch, done = _events(b"".join(pending))
            if batch:
                yield batch
            if not done:
                raise BackendBadAnswer(
                    f"backend {self.name} ended the stream without [DONE]",
                    backend=self.name,
                    code="backend_stream_truncated",
                )
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
