"""The HTTP server's own error answers in OpenAI's error format.

Bytes that do not parse as HTTP never reach the app: uvicorn answers them itself with a
plain-text 400. This protocol answers them like every other error of the gateway, as JSON
`{"error": {...}}` with an `x-gateway-request-id`, and still closes the connection.
"""

from __future__ import annotations

import uuid

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_encode = msgspec.json.Encoder().encode


def malformed_http_response(message: str, request_id: str) -> bytes:
    """A complete HTTP/1.1 400 response with OpenAI's error body; the connection closes after it."""
    body = _encode({"error": {"message": message, "type": "invalid_request_error", "param": None,
                              "code": "invalid_http"}})  # fmt: skip
    head = (
        "HTTP/1.1 400 Bad Request\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"x-gateway-request-id: {request_id}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GatewayHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the malformed-request answer in OpenAI's format."""

    def send_400_response(self, msg: str) -> None:
        self.transport.write(malformed_http_response(msg, uuid.uuid4().hex))
        self.transport.close()
