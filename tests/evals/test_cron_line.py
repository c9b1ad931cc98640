"""The nightly cron line of README.md (and evals/README.md) works as written: the eval run with
the backend it names, then `gateway eval traffic --since 24h`, which needs no backend, in a
shell with no GATEWAY_BACKEND. Only the paths and the backend URL are swapped for the test's."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from serving.fake import FakeBackendThread

REPO = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"```cron\n(.*?)\n```", re.DOTALL)


def cron_lines(readme: Path) -> list[str]:
    return [line for block in _BLOCK.findall(readme.read_text(encoding="utf-8")) for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]  # fmt: skip


@pytest.mark.parametrize("readme", ["README.md", "evals/README.md"])
def test_the_readme_cron_line_works_as_written(readme: str, tmp_path: Path, fake_backend: FakeBackendThread) -> None:
    lines = cron_lines(REPO / readme)
    assert len(lines) == 1, lines
    fields = lines[0].split(None, 5)
    assert fields[:5] == ["30", "2", "*", "*", "*"]
    command = fields[5]
    assert "cd /srv/gateway" in command and "http://vllm:8000" in command and "eval traffic" in command

    root = tmp_path / "srv" / "gateway"
    (root / "evals" / "datasets").mkdir(parents=True)
    (root / ".venv").symlink_to(REPO / ".venv")
    items = [{"question": f"What is {i} plus {i}?", "reference": f"{i} plus {i} is {2 * i}.",
              "fake": {"answer": f"{i} plus {i} is {2 * i}."}} for i in range(3)]  # fmt: skip
    (root / "evals" / "datasets" / "sample.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    log = tmp_path / "gateway-eval.log"
    command = (
        command.replace("cd /srv/gateway", f"cd {root}")
        .replace("http://vllm:8000", fake_backend.url)
        .replace("/var/log/gateway-eval.log", str(log))
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {"GATEWAY_EMBEDDING_MODEL": "hashing", "GATEWAY_SAMPLE_CORPUS": "false"}  # the test's speed only
    done = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=540)
    written = log.read_text(encoding="utf-8")
    assert done.returncode == 0, (done.stdout, done.stderr, written[-3000:])
    summaries = [json.loads(line) for line in written.splitlines() if line.startswith("{")]
    assert [s["kind"] for s in summaries] == ["dataset", "traffic"], written[-3000:]
    dataset, traffic = summaries
    assert dataset["status"] == "passed" and dataset["metrics"]["pass_rate"] == 1.0
    assert traffic["status"] == "unchecked" and traffic["exit_code"] == 0
    # The only rows in the log are the eval run's own: live traffic re-scoring leaves them out.
    assert traffic["metrics"]["requests"] == 0
    assert "no backend" not in written
    assert (root / "data" / "gateway.db").is_file()


def test_traffic_without_a_backend_says_when_the_policy_needs_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from evals.nightly import EXIT_ERROR
    from gateway.cli import main as gateway_main

    for name in [k for k in os.environ if k.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("GATEWAY_EMBEDDING_MODEL", "hashing")
    monkeypatch.setenv("GATEWAY_SAMPLE_CORPUS", "false")
    policy = tmp_path / "policy.toml"
    policy.write_text('[guards.groundedness]\nmode = "llm"\n', encoding="utf-8")
    argv = ["eval", "traffic", "--since", "24h", "--no-progress", "--data-dir", str(tmp_path / "data")]
    assert gateway_main([*argv, "--policy", str(policy)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "groundedness method 'llm' asks a backend model" in err and "--backend URL" in err
    assert gateway_main(argv) == 0  # the default policy re-scores without one
