"""The two commands of a fresh clone: `./run.sh` and `./test.sh` set up what is missing through
`./setup.sh`, which skips its pip steps while its stamps match, so a second run takes seconds.

The scripts run in a copy of the repository's scripts with stand-ins for the environments: `pip`
and `gateway` only write down how they were called, so nothing is installed or downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RECORDER = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
"""


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """setup.sh, run.sh, test.sh and pyproject.toml, and recording stand-ins for the environments."""
    for name in ("setup.sh", "run.sh", "test.sh", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    log = tmp_path / "calls.log"
    log.touch()
    for env in (".venv", ".venv-vllm"):
        for tool in ("python", "pip", "gateway"):
            path = tmp_path / env / "bin" / tool
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(RECORDER.format(log=log))
            path.chmod(0o755)
    bin_dir = tmp_path / "stubs"  # a chromium on PATH: setup.sh must not reach for apt-get here
    bin_dir.mkdir()
    (bin_dir / "chromium").write_text("#!/bin/sh\n")
    (bin_dir / "chromium").chmod(0o755)
    return tmp_path


def run(clone: Path, *command: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PATH": f"{clone / 'stubs'}:{os.environ['PATH']}", "SKIP_VLLM": "1", **env}
    environ.pop("GATEWAY_BACKEND", None)
    environ.pop("GATEWAY_DATA_DIR", None)
    return subprocess.run(command, cwd=clone, env=environ, capture_output=True, text=True, timeout=60, check=False)


def calls(clone: Path) -> list[str]:
    return (clone / "calls.log").read_text().splitlines()


def test_setup_runs_pip_once_then_skips_until_its_inputs_change(clone: Path) -> None:
    assert run(clone, "./setup.sh", "--check").returncode == 1  # never set up here
    assert run(clone, "./setup.sh", "--quiet").returncode == 0
    first = calls(clone)
    assert any("install -q -e .[ml,dev]" in c for c in first)
    assert run(clone, "./setup.sh", "--check").returncode == 0
    second = run(clone, "./setup.sh")
    assert second.returncode == 0 and "up to date" in second.stdout
    assert calls(clone) == first  # no pip call at all the second time
    with (clone / "pyproject.toml").open("a") as f:
        f.write("\n# a new dependency\n")
    assert run(clone, "./setup.sh", "--check").returncode == 1
    assert run(clone, "./setup.sh", "--quiet").returncode == 0
    assert len(calls(clone)) > len(first)


def test_a_failed_quiet_setup_shows_the_end_of_its_log(clone: Path) -> None:
    (clone / ".venv" / "bin" / "pip").write_text("#!/bin/sh\necho 'no index reachable' >&2\nexit 1\n")
    failed = run(clone, "./setup.sh", "--quiet")
    assert failed.returncode != 0
    assert "setup failed" in failed.stdout and "no index reachable" in failed.stdout
    assert run(clone, "./setup.sh", "--check").returncode == 1  # no stamp for a failed set-up


def test_run_sets_up_what_is_missing_then_serves_with_the_arguments(clone: Path) -> None:
    started = run(clone, "./run.sh", "--port", "8080", "--open")
    assert started.returncode == 0
    assert any("install -q -e .[ml,dev]" in c for c in calls(clone))
    assert calls(clone)[-1] == "gateway serve --port 8080 --open"
    again = len(calls(clone))
    assert run(clone, "./run.sh").returncode == 0
    assert calls(clone)[again:] == ["gateway serve"]  # set up already: straight to serving


def test_run_with_a_backend_needs_no_local_vllm(clone: Path) -> None:
    started = run(clone, "./run.sh", "--backend", "http://gpu-1:8000", SKIP_VLLM="0")
    assert started.returncode == 0
    assert not any(c.startswith("pip") and "vllm" in c for c in calls(clone))
    assert calls(clone)[-1] == "gateway serve --backend http://gpu-1:8000"


def test_test_sh_sets_up_first(clone: Path) -> None:
    finished = run(clone, "./test.sh", "-q")
    assert finished.returncode == 0
    log = calls(clone)
    setup = max(i for i, c in enumerate(log) if "install" in c)
    pytest_runs = [i for i, c in enumerate(log) if "-m pytest" in c]
    assert len(pytest_runs) == 2 and setup < pytest_runs[0]
