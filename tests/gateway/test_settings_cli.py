"""Settings precedence and validation (in every subcommand), the CLI's key and database commands,
and router failover."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import cli
from gateway.settings import Settings, SettingsError, load_settings
from serving.fake import FakeBackendThread, FakeConfig
from serving.router import Router
from serving.vllm import VLLMBackend
from tests.helpers import audit_rows

ROOT = Path(__file__).resolve().parents[2]


def test_precedence_is_flags_then_environment_then_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('port = 9000\nhost = "0.0.0.0"\nbackend = ["http://file:1"]\nmax_body_bytes = 2048\n')
    env = {"GATEWAY_CONFIG": str(config), "GATEWAY_PORT": "9100", "GATEWAY_BACKEND": "http://a:1 http://b:2"}
    settings = load_settings({"port": 9200}, environ=env)
    assert settings.port == 9200  # flag
    assert settings.backend == ("http://a:1", "http://b:2")  # environment over file
    assert settings.host == "0.0.0.0" and settings.max_body_bytes == 2048  # file
    assert settings.database_url.startswith("sqlite+aiosqlite:///") and settings.database_url.endswith("gateway.db")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GATEWAY_PORT": "eighty"}, "GATEWAY_PORT"),
        ({"GATEWAY_PORT": "70000"}, "port 70000"),
        ({"GATEWAY_BACKEND": "localhost:8000"}, "must start with http"),
        ({"GATEWAY_DATABASE": "mysql://x/y"}, "unsupported database"),
        ({"GATEWAY_OPEN_MODE": "perhaps"}, "expected true or false"),
        ({"GATEWAY_CONFIG": "/nonexistent/gw.toml"}, "does not exist"),
    ],
)
def test_bad_settings_fail_at_start_with_a_clear_message(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(environ=env)


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    with pytest.raises(SettingsError, match=r"broken\.toml.*line 1"):
        load_settings(environ={"GATEWAY_CONFIG": str(broken)})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("prot = 80\n")
    with pytest.raises(SettingsError, match="unknown setting 'prot'"):
        load_settings(environ={"GATEWAY_CONFIG": str(unknown)})


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_keys_and_db_honour_gateway_database(tmp_path: Path) -> None:
    env = {"GATEWAY_DATABASE": f"sqlite:///{tmp_path / 'elsewhere.db'}", "GATEWAY_DATA_DIR": str(tmp_path / "d")}
    upgraded = run_cli("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    created = run_cli("keys", "create", "--role", "reviewer", "--name", "ana", env=env)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("sk-gw-") and len(secret) > 40
    listed = run_cli("keys", "list", env=env)
    assert "reviewer" in listed.stdout and "ana" in listed.stdout and secret not in listed.stdout
    assert (tmp_path / "elsewhere.db").exists()
    bad = run_cli("keys", "create", "--role", "emperor", env=env)
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
    wrong_db = run_cli("db", "upgrade", env={"GATEWAY_DATABASE": "oracle://x"})
    assert wrong_db.returncode == 2 and "unsupported database" in wrong_db.stderr


# Each subcommand, one setting it reads: the file's value, the environment over it, a flag over both.
# (argv before the flag, setting, TOML value, environment variable and value, flag and its value, expected).
DB = {"file": "sqlite:///file.db", "env": "sqlite:///env.db", "flag": "sqlite:///flag.db"}
PRECEDENCE: dict[str, tuple[list[str], str, Any, tuple[str, str], list[str], Any]] = {
    "serve": (["serve"], "port", 9000, ("GATEWAY_PORT", "9100"), ["--port", "9200"], (9000, 9100, 9200)),
    "serve open": (["serve"], "open_mode", False, ("GATEWAY_OPEN_MODE", "false"), ["--open"], (False, False, True)),
    "serve backend": (["serve"], "backend", ["http://file:1"], ("GATEWAY_BACKEND", "http://env:1"),
                      ["--backend", "http://flag:1"], (("http://file:1",), ("http://env:1",), ("http://flag:1",))),
    "backend local": (["backend", "local"], "local_vllm_port", 8101, ("GATEWAY_LOCAL_VLLM_PORT", "8102"),
                      ["--port", "8103"], (8101, 8102, 8103)),
    "eval run": (["eval", "run", "--dataset", "set.jsonl"], "backend", ["http://file:1"],
                 ("GATEWAY_BACKEND", "http://env:1"), ["--backend", "http://flag:1"],
                 (("http://file:1",), ("http://env:1",), ("http://flag:1",))),
    "eval run policy": (["eval", "run", "--dataset", "set.jsonl"], "policy", "file.toml",
                        ("GATEWAY_POLICY", "env.toml"), ["--policy", "flag.toml"],
                        (Path("file.toml"), Path("env.toml"), Path("flag.toml"))),
    "eval traffic": (["eval", "traffic", "--since", "1h"], "backend", ["http://file:1"],
                     ("GATEWAY_BACKEND", "http://env:1"), ["--backend", "http://flag:1"],
                     (("http://file:1",), ("http://env:1",), ("http://flag:1",))),
    "eval guards": (["eval", "guards", "--injection"], "policy", "file.toml", ("GATEWAY_POLICY", "env.toml"),
                    ["--policy", "flag.toml"], (Path("file.toml"), Path("env.toml"), Path("flag.toml"))),
    "eval retrieval": (["eval", "retrieval", "--collection", "kb"], "embedding_model", "hashing-8",
                       ("GATEWAY_EMBEDDING_MODEL", "hashing-16"), ["--embedding-model", "hashing-32"],
                       ("hashing-8", "hashing-16", "hashing-32")),
    "ingest": (["ingest", "docs", "--collection", "kb"], "embedding_model", "hashing-8",
               ("GATEWAY_EMBEDDING_MODEL", "hashing-16"), ["--embedding-model", "hashing-32"],
               ("hashing-8", "hashing-16", "hashing-32")),
    "ingest data dir": (["ingest", "docs", "--collection", "kb"], "data_dir", "file-data",
                        ("GATEWAY_DATA_DIR", "env-data"), ["--data-dir", "flag-data"],
                        (Path("file-data"), Path("env-data"), Path("flag-data"))),
    "keys create": (["keys", "create", "--role", "client"], "database", DB["file"], ("GATEWAY_DATABASE", DB["env"]),
                    ["--database", DB["flag"]], (DB["file"], DB["env"], DB["flag"])),
    "keys list": (["keys", "list"], "database", DB["file"], ("GATEWAY_DATABASE", DB["env"]),
                  ["--database", DB["flag"]], (DB["file"], DB["env"], DB["flag"])),
    "keys revoke": (["keys", "revoke", "key_x"], "database", DB["file"], ("GATEWAY_DATABASE", DB["env"]),
                    ["--database", DB["flag"]], (DB["file"], DB["env"], DB["flag"])),
    "keys update": (["keys", "update", "key_x", "--rpm", "5"], "database", DB["file"],
                    ("GATEWAY_DATABASE", DB["env"]), ["--database", DB["flag"]], (DB["file"], DB["env"], DB["flag"])),
    "usage": (["usage", "--by", "model"], "database", DB["file"], ("GATEWAY_DATABASE", DB["env"]),
              ["--database", DB["flag"]], (DB["file"], DB["env"], DB["flag"])),
    "db upgrade": (["db", "upgrade"], "database", DB["file"], ("GATEWAY_DATABASE", DB["env"]),
                   ["--database", DB["flag"]], (DB["file"], DB["env"], DB["flag"])),
    "db prune": (["db", "prune", "--older-than", "30"], "data_dir", "file-data", ("GATEWAY_DATA_DIR", "env-data"),
                 ["--data-dir", "flag-data"], (Path("file-data"), Path("env-data"), Path("flag-data"))),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(PRECEDENCE))
def test_every_subcommand_gets_settings_from_file_then_environment_then_flags(tmp_path: Path, case: str) -> None:
    argv, name, in_file, (env_name, env_value), flag, expected = PRECEDENCE[case]
    config = tmp_path / "gw.toml"
    config.write_text(f"{name} = {json.dumps(in_file)}\n", encoding="utf-8")
    argv = [*argv, "--config", str(config)]
    seen = [
        cli.parse(argv, environ={}).settings,
        cli.parse(argv, environ={env_name: env_value}).settings,
        cli.parse([*argv, *flag], environ={env_name: env_value}).settings,
    ]
    assert [getattr(s, name) for s in seen] == list(expected)
    assert all(s.config == config for s in seen)


def test_the_command_gets_its_own_options_and_the_settings(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text('backend = ["http://file:1"]\neval_max_tokens = 7\n', encoding="utf-8")
    run = cli.parse(["eval", "run", "--dataset", "set.jsonl", "--tolerance", "0.1", "--config", str(config)], {})
    assert run.command.__module__ == "evals.nightly" and run.command.__name__ == "run_dataset"
    assert run.args.dataset == Path("set.jsonl") and run.args.tolerance == 0.1
    assert run.settings.backend == ("http://file:1",) and run.settings.eval_max_tokens == 7
    serve = cli.parse(["serve", "--open", "--alias", "kb=sample:m", "--limits-fail", "closed"], {"GATEWAY_PORT": "81"})
    assert serve.command is cli.cmd_serve
    assert serve.settings == Settings(port=81, open_mode=True, alias=("kb=sample:m",), limits_fail="closed")
    fake = cli.parse(["backend", "fake", "--port", "8300"], {"GATEWAY_PORT": "81"})
    assert fake.args.fake_port == 8300 and fake.settings.port == 81  # the fake's port is not the gateway's
    with pytest.raises(SettingsError, match="GATEWAY_PORT"):
        cli.parse(["db", "upgrade"], {"GATEWAY_PORT": "eighty"})


def test_eval_run_uses_the_config_files_backend(
    tmp_path: Path, fake_backend: FakeBackendThread, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "gw.toml"
    config.write_text(
        f'backend = ["{fake_backend.url}"]\ndata_dir = "{tmp_path / "data"}"\n'
        'embedding_model = "hashing"\nsample_corpus = false\neval_max_tokens = 11\n',
        encoding="utf-8",
    )
    dataset = tmp_path / "set.jsonl"
    dataset.write_text(json.dumps({"question": "Which backend answers this?"}) + "\n", encoding="utf-8")
    before = len(httpx.get(fake_backend.url + "/fake/requests").json())
    argv = ["eval", "run", "--dataset", str(dataset), "--config", str(config), "--no-progress", "--json",
            "--latency-margin", "1e9"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "passed" and Path(summary["report"]).parent == tmp_path / "data" / "reports"
    sent = httpx.get(fake_backend.url + "/fake/requests").json()
    assert len(sent) > before and sent[-1]["max_tokens"] == 11
    assert sent[-1]["messages"][-1]["content"].endswith("Which backend answers this?")


async def test_router_fails_over_to_a_live_backend(fake_backend: FakeBackendThread) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    router = Router([VLLMBackend(dead, connect_timeout=1), VLLMBackend(fake_backend.url)])
    try:
        await router.refresh()
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        answers = [await router.complete("/v1/chat/completions", body) for _ in range(4)]
        assert all(a["choices"][0]["message"]["content"] for a in answers)
        streamed = [p async for p in router.stream("/v1/chat/completions", {**body, "stream": True})]
        assert streamed
        assert await router.health_by_backend() == {dead: False, fake_backend.url: True}
    finally:
        await router.aclose()


async def test_router_sends_each_model_to_the_backend_that_serves_it() -> None:
    with (
        FakeBackendThread(FakeConfig(models=("alpha",))) as a,
        FakeBackendThread(FakeConfig(models=("beta",))) as b,
    ):
        router = Router([VLLMBackend(a.url), VLLMBackend(b.url)])
        try:
            await router.refresh()
            for model in ("alpha", "beta", "alpha"):
                await router.complete("/v1/completions", {"model": model, "prompt": "x"})
            assert sorted(m.id for m in await router.models()) == ["alpha", "beta"]
        finally:
            await router.aclose()
        stats_a = await asyncio.to_thread(httpx.get, a.url + "/fake/stats")
        stats_b = await asyncio.to_thread(httpx.get, b.url + "/fake/stats")
        assert stats_a.json()["requests"] == 2
        assert stats_b.json()["requests"] == 1


def test_open_mode_needs_no_key(tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    from tests.conftest import make_settings
    from tests.helpers import serving

    settings = make_settings(tmp_path, fake_backend.url, open_mode=True)
    with serving(settings, key="anything") as (gw, client):
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
        assert httpx.get(gw.url + "/readyz").json()["open_mode"] is True
    assert [r["api_key_id"] for r in audit_rows(settings)] == ["open"]
