"""Eval verdicts against thresholds: the set's header, flags, the default, exit codes, and
`regressed` reported beside the status, never instead of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.dataset import DatasetError, load_eval_set
from evals.nightly import EXIT_ERROR, EXIT_FAILED, EXIT_PASSED, EXIT_REGRESSED, exit_code
from evals.thresholds import (
    DEFAULT_DATASET_THRESHOLDS,
    Threshold,
    ThresholdError,
    combine,
    from_header,
    parse_flag,
    verdict,
)
from gateway.cli import main as gateway_main
from serving.fake import FakeBackendThread


def test_flags_take_the_metrics_good_side_or_the_one_given() -> None:
    assert parse_flag("pass_rate=0.8") == Threshold("pass_rate", ">=", 0.8, "flag")
    assert parse_flag("latency_p95_ms=2500") == Threshold("latency_p95_ms", "<=", 2500.0, "flag")
    assert parse_flag("error_rate = 0") == Threshold("error_rate", "<=", 0.0, "flag")
    assert parse_flag("blocked_rate>=0.05") == Threshold("blocked_rate", ">=", 0.05, "flag")
    assert parse_flag("toxicity_recall=0.5") == Threshold("toxicity_recall", ">=", 0.5, "flag")
    assert parse_flag("ratings_groundedness_precision>=0.7").op == ">="
    assert parse_flag("rating_negative_rate=0.2").op == "<="


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("pass_rate", "METRIC=VALUE"),
        ("pass_rate=high", "not a number"),
        ("pass_rate=nan", "finite"),
        ("pass_rte=0.8", "unknown metric 'pass_rte'"),
        ("blocked_rate=0.1", "blocked_rate>=VALUE or blocked_rate<=VALUE"),
    ],
)
def test_bad_flags_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ThresholdError, match=says):
        parse_flag(text)


def test_header_thresholds_and_flags_combine() -> None:
    header = from_header({"pass_rate": 0.9, "latency_p95_ms": {"max": 3000}, "blocked_rate": {"min": 0.1, "max": 0.3}},
                         "set.jsonl:1")  # fmt: skip
    assert [t.describe() for t in header] == [
        "pass_rate >= 0.9", "latency_p95_ms <= 3000", "blocked_rate >= 0.1", "blocked_rate <= 0.3"
    ]  # fmt: skip
    flags = [parse_flag("pass_rate=0.5")]
    chosen = combine(header, flags, DEFAULT_DATASET_THRESHOLDS)
    assert {t.describe(): t.source for t in chosen} == {
        "pass_rate >= 0.5": "flag", "latency_p95_ms <= 3000": "dataset header",
        "blocked_rate >= 0.1": "dataset header", "blocked_rate <= 0.3": "dataset header",
    }  # fmt: skip
    assert combine([], [], DEFAULT_DATASET_THRESHOLDS) == list(DEFAULT_DATASET_THRESHOLDS)
    assert combine([], []) == []
    with pytest.raises(ThresholdError, match=r"thresholds\.latency_p95_ms"):
        from_header({"latency_p95_ms": {"below": 3}}, "set.jsonl:1")
    with pytest.raises(ThresholdError, match="finite number"):
        from_header({"pass_rate": "0.8"}, "set.jsonl:1")


def test_verdicts() -> None:
    rules = [Threshold("pass_rate", ">=", 0.8, "default")]
    failed = verdict(rules, {"pass_rate": 0.18})
    assert failed.status == "failed"
    assert failed.reason == "pass_rate 0.18 is not >= 0.8 (default threshold: the set names none)"
    assert verdict(rules, {"pass_rate": 0.8}).status == "passed"
    # A threshold the run could not measure is not met.
    unmeasured = verdict([Threshold("retrieval_recall", ">=", 0.5, "flag")], {"retrieval_recall": None})
    assert unmeasured.status == "failed" and "not measured" in unmeasured.reason
    assert unmeasured.checks[0]["actual"] is None and unmeasured.checks[0]["ok"] is False
    unchecked = verdict([], {"pass_rate": 0.1})
    assert unchecked.status == "unchecked" and "no thresholds" in unchecked.reason


def test_exit_codes_put_failed_before_regressed() -> None:
    assert exit_code("error", True, True) == EXIT_ERROR == 2
    assert exit_code("failed", True, True) == EXIT_FAILED == 1
    assert exit_code("passed", True) == EXIT_REGRESSED == 3
    assert exit_code("unchecked", False, True) == 4
    assert exit_code("passed", False) == EXIT_PASSED == 0


def _write(path: Path, lines: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def test_the_header_line_is_read_and_checked(tmp_path: Path) -> None:
    item = {"question": "q?", "reference": "a"}
    eval_set = load_eval_set(_write(tmp_path / "a.jsonl", [{"thresholds": {"pass_rate": 0.9}, "description": "d"},
                                                           item]))  # fmt: skip
    assert len(eval_set.items) == 1 and eval_set.description == "d"
    assert eval_set.thresholds == [Threshold("pass_rate", ">=", 0.9, "dataset header")]
    assert load_eval_set(_write(tmp_path / "b.jsonl", [item])).thresholds == []
    with pytest.raises(DatasetError, match=r"b\.jsonl:1: a header line holds only .* not threshold"):
        load_eval_set(_write(tmp_path / "b.jsonl", [{"threshold": {"pass_rate": 0.9}}, item]))
    with pytest.raises(DatasetError, match=r"b\.jsonl:1: thresholds\.pass_rat: unknown metric"):
        load_eval_set(_write(tmp_path / "b.jsonl", [{"thresholds": {"pass_rat": 0.9}}, item]))
    with pytest.raises(DatasetError, match=r"b\.jsonl:2: each line must be an object with a non-empty 'question'"):
        load_eval_set(_write(tmp_path / "b.jsonl", [item, {"thresholds": {"pass_rate": 0.9}}]))
    with pytest.raises(DatasetError, match="no items"):
        load_eval_set(_write(tmp_path / "b.jsonl", [{"thresholds": {"pass_rate": 0.9}}]))


def _argv(dataset: Path, tmp_path: Path, backend: str, *more: str) -> list[str]:
    return ["eval", "run", "--dataset", str(dataset), "--data-dir", str(tmp_path / "data"), "--backend", backend,
            "--no-progress", "--json", "--latency-margin", "1e9", *more]  # fmt: skip


def _last(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    out = capsys.readouterr().out.strip().splitlines()
    summary: dict[str, object] = json.loads(out[-1])
    return summary


def _items(right: int, wrong: int) -> list[dict[str, object]]:
    lines: list[dict[str, object]] = []
    for i in range(right + wrong):
        reference = f"The answer is number {i}."
        answer = reference if i < right else "Purple elephants dance at noon."
        lines.append({"question": f"Question {i}?", "reference": reference, "fake": {"answer": answer}})
    return lines


def test_cli_thresholds_from_the_header_and_flags(
    tmp_path: Path, fake_backend: FakeBackendThread, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_EMBEDDING_MODEL", "hashing")
    monkeypatch.setenv("GATEWAY_SAMPLE_CORPUS", "false")
    monkeypatch.delenv("GATEWAY_BACKEND", raising=False)
    dataset = _write(tmp_path / "set.jsonl", [{"thresholds": {"pass_rate": 0.9}}, *_items(3, 1)])

    # The header asks 0.9; 3 of 4 right is 0.75: failed, exit 1.
    assert gateway_main(_argv(dataset, tmp_path, fake_backend.url)) == EXIT_FAILED
    summary = _last(capsys)
    assert summary["status"] == "failed" and summary["verdict"] == "pass_rate 0.75 is not >= 0.9"
    assert summary["thresholds"] == [{"metric": "pass_rate", "op": ">=", "value": 0.9, "actual": 0.75, "ok": False,
                                      "source": "dataset header"}]  # fmt: skip

    # A flag replaces the header's threshold on the same metric: passed, exit 0.
    assert gateway_main(_argv(dataset, tmp_path, fake_backend.url, "--min-pass-rate", "0.7", "--name", "b")) == 0
    summary = _last(capsys)
    assert summary["status"] == "passed" and summary["verdict"] == "met: pass_rate 0.75 >= 0.7"

    # Flags add thresholds on other metrics; every one must hold.
    code = gateway_main(_argv(dataset, tmp_path, fake_backend.url, "--min-pass-rate", "0.7", "--threshold",
                              "latency_p50_ms<=0.0001", "--name", "c"))  # fmt: skip
    assert code == EXIT_FAILED
    assert "latency_p50_ms" in str(_last(capsys)["verdict"])

    # A bad threshold stops the run before it starts: exit 2, the message names it.
    assert gateway_main(_argv(dataset, tmp_path, fake_backend.url, "--threshold", "pass_rte=1")) == EXIT_ERROR
    assert "unknown metric 'pass_rte'" in capsys.readouterr().err
    assert gateway_main(_argv(dataset, tmp_path, fake_backend.url, "--min-pass-rate", "80")) == EXIT_ERROR
    assert "between 0 and 1" in capsys.readouterr().err


def test_regressed_is_reported_beside_a_passed_status(
    tmp_path: Path, fake_backend: FakeBackendThread, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_EMBEDDING_MODEL", "hashing")
    monkeypatch.setenv("GATEWAY_SAMPLE_CORPUS", "false")
    monkeypatch.delenv("GATEWAY_BACKEND", raising=False)
    header = {"thresholds": {"pass_rate": 0.5}}
    dataset = _write(tmp_path / "set.jsonl", [header, *_items(4, 0)])
    argv = _argv(dataset, tmp_path, fake_backend.url)
    assert gateway_main(argv) == EXIT_PASSED
    first = _last(capsys)
    assert first["status"] == "passed" and first["regressed"] is False

    _write(dataset, [header, *_items(3, 1)])  # 0.75: still above 0.5, but 0.25 worse than the last run
    assert gateway_main(argv) == EXIT_REGRESSED
    second = _last(capsys)
    assert second["status"] == "passed" and second["regressed"] is True
    comparison = second["comparison"]
    assert isinstance(comparison, dict) and comparison["previous_run"] == first["run_id"]
    assert "pass_rate" in {r["metric"] for r in comparison["regressions"]}

    # The text summary says both.
    assert gateway_main([a for a in argv if a != "--json"]) == EXIT_PASSED  # the same 0.75 again: no regression
    text = capsys.readouterr().out
    assert "): passed" in text and "met: pass_rate 0.75 >= 0.5" in text
    assert f"regressed: no (against run {second['run_id']})" in text
