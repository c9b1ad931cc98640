"""Rollout against the real CPU vLLM: two deployments of the bundled model under different names
(blue and green, served as client model `chat`), a shadow taking a copy of every request, and
`gateway eval compare` over what they logged."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from gateway.cli import main as gateway_main
from gateway.settings import load_settings
from tests.helpers import GatewayServer, audit_rows, create_key, prepare_database

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m-instruct"


def config(vllm_url: str) -> str:
    return f"""
sticky = "user"
[[deployments]]
name = "blue"
model = "chat"
backend = "{vllm_url}"
backend_model = "{MODEL}"
weight = 50

[[deployments]]
name = "green"
model = "chat"
backend = "{vllm_url}"
backend_model = "{MODEL}"
weight = 50

[[deployments]]
name = "candidate"
model = "chat"
backend = "{vllm_url}"
backend_model = "{MODEL}"
shadow = 1.0
"""


def test_deployments_shadow_and_compare_on_the_real_vllm(
    vllm_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(config(vllm_url), encoding="utf-8")
    settings = load_settings(
        {"config": path, "data_dir": tmp_path, "embedding_model": "hashing", "sample_corpus": False}
    )
    prepare_database(settings)
    _, admin = create_key(settings, "admin")
    users = [f"user-{i}" for i in range(6)]
    with (
        GatewayServer(settings) as gateway,
        httpx.Client(base_url=gateway.url, headers={"authorization": f"Bearer {admin}"}, timeout=300) as http,
    ):
        models = {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert "chat" in models
        answers = []
        for i, user in enumerate(users):
            body = {"model": "chat", "user": user, "temperature": 0, "max_tokens": 12,
                    "messages": [{"role": "user", "content": f"Name a colour. ({i})"}]}  # fmt: skip
            answer = http.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == MODEL and answer.json()["choices"][0]["message"]["content"]
            assert answer.json()["gateway"]["deployment"] == answer.headers["x-gateway-deployment"]
            answers.append(answer)
        hello = {"model": "chat", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        forced = http.post("/v1/chat/completions", headers={"x-gateway-deployment": "green"}, json=hello)
        assert forced.status_code == 200 and forced.headers["x-gateway-deployment"] == "green"
        deadline = time.monotonic() + 300
        while len(audit_rows(settings, deployment="candidate")) < 6 and time.monotonic() < deadline:
            time.sleep(0.5)
    assert {a.headers["x-gateway-deployment"] for a in answers} <= {"blue", "green"}
    copies = audit_rows(settings, deployment="candidate")
    assert len(copies) == 6 and all(c["status"] == "ok" and c["response_text"] for c in copies)
    # Every client request got its copy; the admin's forced request (a test) got none.
    assert {c["shadow_of"] for c in copies} == {a.headers["x-gateway-request-id"] for a in answers}
    for row in audit_rows(settings):
        assert row["config_version"] and row["gateway_version"] and row["backend_model"] == MODEL

    database = f"sqlite:///{tmp_path / 'gateway.db'}"
    # Primary and copy share one CPU vLLM here, so latency is loose; answers must agree.
    code = gateway_main(["eval", "compare", "--model", "chat", "--since", "1h", "--min-requests", "1",
                         "--max-latency-increase", "10", "--min-agreement", "0.8",
                         "--database", database, "--data-dir", str(tmp_path), "--json"])  # fmt: skip
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == summary["exit_code"] == 0, summary["verdict"]
    assert summary["candidate"] == "candidate" and summary["agreement"]["pairs"] == 6
    # Greedy decoding of the same model: the shadow says what the primary said.
    assert summary["agreement"]["mean"] > 0.8
    assert "verdict:" in out and Path(summary["report"]).read_text().startswith("<!doctype html>")
