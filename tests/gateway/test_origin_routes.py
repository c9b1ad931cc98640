"""The overview and usage routes count live traffic by default: rows of eval runs
(`origin = 'eval'`) only with `?origin=eval` or `?origin=all`; an unknown origin is a 400."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx

from gateway.settings import Settings
from tests.gateway.test_overview import _insert, _row
from tests.helpers import GatewayServer, create_key


def test_overview_and_usage_leave_eval_rows_out_unless_asked(settings: Settings) -> None:
    now = datetime.now(UTC)
    live = [_row(now - timedelta(minutes=m), api_key_id="key_app", origin=None) for m in range(1, 8)]
    evals = [_row(now - timedelta(minutes=m), "blocked", blocked_by="injection", api_key_id="eval", origin="eval")
             for m in range(1, 21)]  # fmt: skip
    _insert(settings, live + evals)
    _, admin = create_key(settings, "admin", "ops")
    auth = {"authorization": f"Bearer {admin}"}
    with GatewayServer(settings) as gw, httpx.Client(base_url=gw.url, headers=auth) as http:
        default = http.get("/api/review/overview?window=1h").json()
        assert default["origin"] == "live" and default["totals"]["requests"] == 7
        assert default["totals"]["blocked"] == 0 and default["guards"] == []
        only_eval = http.get("/api/review/overview?window=1h&origin=eval").json()
        assert only_eval["totals"]["requests"] == 20 and only_eval["totals"]["blocked"] == 20
        assert http.get("/api/review/overview?window=1h&origin=all").json()["totals"]["requests"] == 27
        bad = http.get("/api/review/overview?window=1h&origin=tests")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "origin"

        rows = http.get("/api/usage?since=1h").json()
        assert rows["origin"] == "live" and [(r["group"], r["requests"]) for r in rows["rows"]] == [("key_app", 7)]
        rows = http.get("/api/usage?since=1h&origin=all").json()["rows"]
        assert [(r["group"], r["requests"], r["blocked"]) for r in rows] == [("eval", 20, 20), ("key_app", 7, 0)]
        bad = http.get("/api/usage?origin=everything")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "origin"
        page = http.get("/review/usage?since=1h")
        assert page.status_code == 200 and "key_app" in page.text and ">eval<" not in page.text
