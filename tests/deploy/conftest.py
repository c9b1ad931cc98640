"""Shared helpers for the deployment checks: the repository root, kustomize renders, the set of
`GATEWAY_*` names the gateway really reads."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
RENDERS = {"main": K8S, "cpu": K8S / "overlays" / "cpu"}


def gateway_env_names() -> set[str]:
    """Every variable the gateway reads: one per Settings field, plus GATEWAY_CONFIG and GATEWAY_OPEN."""
    return {ENV_PREFIX + f.name.upper() for f in fields(Settings)} | {ENV_PREFIX + "CONFIG", ENV_PREFIX + "OPEN"}


def render(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the kustomizations (kubectl kustomize)")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Both renders, once per session: the main set and the laptop (cpu) overlay."""
    return {name: render(directory) for name, directory in RENDERS.items()}


@pytest.fixture(params=sorted(RENDERS))
def docs(request: pytest.FixtureRequest, rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return rendered[request.param]


@pytest.fixture
def main_docs(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return rendered["main"]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    return doc["spec"]["template"]["metadata"]["labels"]


WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


def containers(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container and init container in the render."""
    out = []
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            spec = pod_spec(doc)
            for container in spec.get("initContainers", []) + spec["containers"]:
                out.append((doc, container))
    return out


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))
