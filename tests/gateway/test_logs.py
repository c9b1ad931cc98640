"""Structured logs: JSON lines, and the request id on every line written while a request runs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from gateway.logs import REQUEST_ID, JsonFormatter, RequestContextFilter, make_handler
from gateway.pipeline import CHAT, Trace
from gateway.settings import SettingsError, load_settings


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    logger = logging.getLogger("gateway.test-logs")
    handler = make_handler("json", stream)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_request_id_of_concurrent_requests(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured

    async def request(n: int) -> str:
        trace = Trace(CHAT, "127.0.0.1")  # a Trace makes its id the current one for this task
        await asyncio.sleep(0)
        logger.info("request %d working", n)
        await asyncio.sleep(0)
        logger.warning("request %d done", n)
        return trace.request_id

    async def main() -> list[str]:
        return list(await asyncio.gather(*(asyncio.create_task(request(n)) for n in range(3))))

    ids = asyncio.run(main())
    logger.info("no request here")
    got = lines(stream)
    assert len(got) == 7
    for n, request_id in enumerate(ids):
        mine = [g for g in got if str(g["message"]).startswith(f"request {n} ")]
        assert [g["request_id"] for g in mine] == [request_id, request_id]
        assert {g["level"] for g in mine} == {"info", "warning"}
    assert got[-1]["message"] == "no request here" and "request_id" not in got[-1]
    assert REQUEST_ID.get() is None  # the tasks' ids stayed in the tasks


def test_exceptions_and_text_format() -> None:
    record = logging.LogRecord("gateway", logging.ERROR, __file__, 1, "boom %s", ("x",), None)
    try:
        raise ValueError("bad")
    except ValueError:
        record.exc_info = sys.exc_info()
    RequestContextFilter().filter(record)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "boom x" and "ValueError: bad" in entry["exception"]

    stream = io.StringIO()
    handler = make_handler("text", stream)
    token = REQUEST_ID.set("abc123")
    try:
        handler.handle(logging.LogRecord("gateway", logging.WARNING, __file__, 1, "hello", (), None))
    finally:
        REQUEST_ID.reset(token)
    assert stream.getvalue().rstrip().endswith("gateway: hello [request abc123]")


def test_log_format_setting() -> None:
    assert load_settings(environ={"GATEWAY_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(SettingsError, match="log_format"):
        load_settings(environ={"GATEWAY_LOG_FORMAT": "yaml"})


def test_json_logs_take_uvicorns_lines_too() -> None:
    from litestar import Litestar

    from gateway.httpserver import server_config
    from gateway.settings import Settings

    app = Litestar(route_handlers=[])
    assert server_config(app, Settings(log_format="json")).log_config is None
    # One log format (issue 18, item 7): text logs take uvicorn's lines through the root handler too.
    assert server_config(app, Settings()).log_config is None


def test_a_workers_lines_say_which_worker_wrote_them() -> None:
    for log_format in ("text", "json"):
        single, worker = io.StringIO(), io.StringIO()
        make_handler(log_format, single).handle(logging.LogRecord("gateway", logging.INFO, __file__, 1, "up", (), None))
        make_handler(log_format, worker, worker=1).handle(
            logging.LogRecord("gateway", logging.INFO, __file__, 1, "up", (), None)
        )
        if log_format == "text":
            assert " INFO gateway: up" in single.getvalue()
            assert " INFO worker 1 gateway: up" in worker.getvalue()
        else:
            assert "worker" not in json.loads(single.getvalue())
            assert json.loads(worker.getvalue())["worker"] == 1
