"""The backend seam: one small async interface that every LLM server client implements.

Bodies travel as decoded JSON dicts so fields the gateway does not know reach the backend
untouched. Streams yield batches: the raw JSON payloads of the server-sent events that arrived
together (without the `data: ` prefix and without the closing `[DONE]`), so a burst of events
is handled, and sent on to the client, in one go.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

#: Extra headers for the backend calls of the request running now (the W3C `traceparent`), set by
#: the gateway per request; a context variable, so concurrent requests never see each other's.
REQUEST_HEADERS: ContextVar[Mapping[str, str] | None] = ContextVar("backend_request_headers", default=None)


@dataclass(frozen=True, slots=True)
class ModelCard:
    """One model a backend serves, as listed by its `/v1/models`."""

    id: str
    owned_by: str
    max_model_len: int | None = None


class Backend(ABC):
    """An OpenAI-compatible LLM server reached over HTTP."""

    name: str

    @abstractmethod
    async def complete(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a non-streaming request (`/v1/chat/completions`, `/v1/completions`) and return the JSON."""

    @abstractmethod
    def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[list[bytes]]:
        """POST a streaming request and yield batches of event payloads (JSON bytes), in order.

        Closing the iterator early (client gone) closes the upstream connection, which makes
        vLLM abort the request and stop generating.
        """

    @abstractmethod
    async def models(self) -> list[ModelCard]:
        """The models this backend serves."""

    @abstractmethod
    async def health(self) -> bool:
        """True when the backend answers its health probe."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections."""
