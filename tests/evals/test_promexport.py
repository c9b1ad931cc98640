"""Eval results as Prometheus metrics: the textfile and a Pushgateway (a local HTTP server here)."""

from __future__ import annotations

import argparse
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from evals import promexport

SUMMARY: dict[str, Any] = {
    "kind": "dataset",
    "name": 'smoke "set"',
    "exit_code": 3,
    "metrics": {"accuracy": 0.75, "block_rate": 0.1, "drift": {"psi": 0.02}, "drifted": ["x"], "ok": True,
                "p50_ms": float("nan"), "guards": {"injection": {"precision": 1.0, "recall": 0.5}}},
}  # fmt: skip


def _samples(text: str) -> dict[str, tuple[dict[str, str], float]]:
    return {s.name: (s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples}


def test_render_is_valid_exposition_with_the_headline_figures() -> None:
    samples = _samples(promexport.render(SUMMARY, now=1700000000.0))
    assert samples["gateway_eval_accuracy"] == ({"kind": "dataset", "name": 'smoke "set"'}, 0.75)
    assert samples["gateway_eval_drift_psi"][1] == 0.02
    assert samples["gateway_eval_guards_injection_recall"][1] == 0.5
    assert samples["gateway_eval_exit_code"][1] == 3
    assert samples["gateway_eval_last_run_timestamp_seconds"][1] == 1700000000.0
    assert "gateway_eval_ok" not in samples and "gateway_eval_p50_ms" not in samples  # no bools, no NaN


def test_textfile_and_pushgateway(tmp_path: Path) -> None:
    got: list[tuple[str, str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            got.append(("PUT", self.path, self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        path = tmp_path / "eval.prom"
        url = f"http://127.0.0.1:{server.server_port}"
        assert promexport.export(SUMMARY, argparse.Namespace(prom_textfile=path, pushgateway=url)) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert _samples(path.read_text())["gateway_eval_accuracy"][1] == 0.75
    assert [p.name for p in tmp_path.iterdir()] == ["eval.prom"]  # no temporary file left behind
    assert got and got[0][1] == "/metrics/job/gateway_eval/kind/dataset/name/smoke%20%22set%22"
    assert _samples(got[0][2].decode())["gateway_eval_exit_code"][1] == 3


def test_export_failure_is_reported_not_raised(tmp_path: Path, capsys: Any) -> None:
    args = argparse.Namespace(prom_textfile=tmp_path / "missing-dir" / "x.prom", pushgateway=None)
    assert promexport.export(SUMMARY, args) == 1
    assert "could not export metrics" in capsys.readouterr().err
    assert promexport.export(SUMMARY, argparse.Namespace()) == 0  # nothing asked: nothing done


def test_eval_commands_take_the_options() -> None:
    from evals.nightly import configure_run_parser, configure_traffic_parser

    for configure in (configure_run_parser, configure_traffic_parser):
        parser = argparse.ArgumentParser()
        configure(parser)
        extra = ["--dataset", "x.jsonl"] if configure is configure_run_parser else []
        args = parser.parse_args([*extra, "--prom-textfile", "a.prom", "--pushgateway", "http://pg:9091"])
        assert (args.prom_textfile, args.pushgateway) == (Path("a.prom"), "http://pg:9091")
