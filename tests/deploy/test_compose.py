"""compose.yaml (the laptop stack): validated with `docker compose config` / `docker-compose config`
where one is installed (neither needs a daemon), and checked structurally with PyYAML."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest

from gateway.cli import build_parser
from tests.deploy.conftest import ROOT, gateway_env_names, load_yaml

COMPOSE = ROOT / "compose.yaml"
GATEWAYS = ("gateway-1", "gateway-2")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_validates() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def test_services(compose: dict[str, Any]) -> None:
    assert {"migrate", *GATEWAYS, "lb", "postgres", "redis", "vllm"} <= set(compose["services"])


def test_migration_runs_once_before_the_gateways(compose: dict[str, Any]) -> None:
    services = compose["services"]
    migrate = services["migrate"]
    args = build_parser().parse_args(migrate["command"][1:])
    assert migrate["command"][0] == "gateway" and (args.command, args.db_command) == ("db", "upgrade")
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in GATEWAYS:
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        serve = build_parser().parse_args(services[name]["command"][1:])
        assert serve.command == "serve" and serve.host == "0.0.0.0"


def test_gateway_variables_are_settings(compose: dict[str, Any]) -> None:
    known = gateway_env_names()
    for name, service in compose["services"].items():
        for variable in service.get("environment", {}):
            if variable.startswith("GATEWAY_"):
                assert variable in known, f"{name}: {variable} is not a gateway setting"
    for name in GATEWAYS:
        env = compose["services"][name]["environment"]
        assert env["GATEWAY_DATABASE"].startswith("postgresql://") and "@postgres:" in env["GATEWAY_DATABASE"]
        assert env["GATEWAY_REDIS"].startswith("redis://redis:")
        assert env["GATEWAY_BACKEND"] == "http://vllm:8000"


def test_replicas_share_what_they_must(compose: dict[str, Any]) -> None:
    services = compose["services"]
    one, two = (services[name] for name in GATEWAYS)
    assert one["image"] == two["image"] == services["migrate"]["image"]
    assert one["volumes"] == two["volumes"] and "gateway-data:/data" in one["volumes"]
    assert one["environment"]["GATEWAY_SESSION_SECRET"] == two["environment"]["GATEWAY_SESSION_SECRET"]
    config = next(v for v in one["volumes"] if v.endswith(":/etc/gateway:ro")).split(":")[0]
    assert (ROOT / config / "gateway.toml").is_file() and (ROOT / config / "policy.toml").is_file()
    # The same grace period as the Kubernetes Deployment.
    assert one["stop_grace_period"] == "120s"


def test_load_balancer_targets_both_replicas(compose: dict[str, Any]) -> None:
    lb = compose["services"]["lb"]
    conf_path = next(v for v in lb["volumes"] if "nginx.conf" in v).split(":")[0]
    conf = (ROOT / conf_path).read_text(encoding="utf-8")
    assert set(re.findall(r"server (gateway-\d):8000", conf)) == set(GATEWAYS)
    assert "proxy_buffering off" in conf, "server-sent events must not be buffered"
    for name in GATEWAYS:
        assert lb["depends_on"][name]["condition"] == "service_healthy"


def test_vllm_serves_a_named_model(compose: dict[str, Any]) -> None:
    vllm = compose["services"]["vllm"]
    assert any(a.startswith("--served-model-name=") for a in vllm["command"])
    assert "/health" in " ".join(vllm["healthcheck"]["test"])
