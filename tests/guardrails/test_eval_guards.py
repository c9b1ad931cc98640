"""`gateway eval guards`: the table and the final JSON line, on small files written here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from evals import guards


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    guards.configure_parser(parser)
    return guards.run(parser.parse_args(argv))


def test_groundedness_and_toxicity_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "knowledge": "Paris is the capital of France.",
                    "question": "What is the capital of France?",
                    "right_answer": "Paris",
                    "hallucinated_answer": "Lyon is the capital of France.",
                },
                {
                    "knowledge": "The Nile is 6,650 km long.",
                    "question": "How long is the Nile?",
                    "right_answer": "6,650 km",
                    "hallucinated_answer": "It is 7,200 km long.",
                },
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    tox = tmp_path / "tox.csv"
    tox.write_text(
        "text,label\nYou are a stupid idiot,1\nHave a nice day,0\nWhat a lovely garden,0\n", encoding="utf-8"
    )
    assert _run(["--groundedness", str(qa), "--toxicity", str(tox), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any("acc=" in line for line in out[:-1])  # the human-readable table comes first
    report = json.loads(out[-1])
    g, t = report["groundedness"], report["toxicity"]
    assert g["n"] == 4 and g["accuracy"] == 1.0 and g["f1"] == 1.0 and g["ms_p99"] >= g["ms_p50"] > 0
    assert t["n"] == 3 and t["tp"] == 1 and t["fp"] == 0 and t["scorer"]["scorer"] == "trained"


def test_davidson_format_and_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    dav = tmp_path / "davidson.csv"
    dav.write_text(
        ",count,hate_speech,offensive_language,neither,class,tweet\n"
        "0,3,0,0,3,2,have a lovely day everyone\n"
        "1,3,0,3,0,1,you stupid idiot\n"
        "2,3,0,0,3,2,the weather is nice\n",
        encoding="utf-8",
    )
    assert _run(["--toxicity", str(dav), "--limit", "2", "--sample", "head", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["toxicity"]["n"] == 2 and report["toxicity"]["tp"] == 1


def test_bad_input_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n", encoding="utf-8")
    assert _run(["--toxicity", str(bad)]) == 2
    assert "expected columns" in capsys.readouterr().err
    assert _run([]) == 2


def test_injection_report(capsys: pytest.CaptureFixture[str]):
    pytest.importorskip("jailbreak_corpus_mini", reason="needs the package jailbreak-corpus-mini-py")
    assert _run(["--injection", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["injection"]
    assert report["attacks"] == 15 and report["benign"] >= 30
    assert report["recall"] == 1.0 and report["fp"] == 0
