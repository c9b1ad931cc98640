"""Per-text cost of the trained toxicity scorer on each MiniLM runtime, single and batched, in one run.

    .venv/bin/python benchmarks/bench_trained_toxicity.py [--n 256] [--rounds 3]

For ONNX Runtime (retrieval's checked export, what `gateway serve` runs by default and what the
scorer shares from the embedder) and PyTorch (what the scorer loads itself when the gateway's
embedder is not the bundled MiniLM, e.g. the hashing embedder), both with one thread per call as
the gateway runs them: one text per call (p50/p99 ms) and 32 texts per call (ms per text). The
texts are the bundled benign chat set's sentences, which is what the guard scores. Rounds
alternate the runtimes so that load from other jobs falls on both alike; the load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from evals.guards import BENIGN_CHAT, read_benign
from evals.train_toxicity import training_encoder
from guardrails.sentences import split_sentences
from guardrails.trained_toxicity import TrainedToxicityScorer


def sentences(n: int) -> list[str]:
    out = []
    for item in read_benign(BENIGN_CHAT):
        for text in (item["prompt"], item["answer"]):
            out += [text[s:e] for s, e in split_sentences(text)]
    return (out * (n // max(1, len(out)) + 1))[:n]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="texts per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per runtime")
    args = parser.parse_args()
    texts = sentences(args.n)
    scorers = {}
    for runtime in ("onnx", "torch"):
        embed, used, _ = training_encoder(runtime, threads=1)
        scorers[used] = TrainedToxicityScorer(embed=embed)
        scorers[used].score_batch(texts[:32])  # warm up
    single: dict[str, list[float]] = {k: [] for k in scorers}
    batched: dict[str, list[float]] = {k: [] for k in scorers}
    print(f"load average before: {os.getloadavg()}")
    for _ in range(args.rounds):
        for name, scorer in scorers.items():
            for text in texts:
                t0 = time.perf_counter()
                scorer.score_batch([text])
                single[name].append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            for start in range(0, len(texts), 32):
                scorer.score_batch(texts[start : start + 32])
            batched[name].append((time.perf_counter() - t0) * 1000 / len(texts))
    print(f"load average after:  {os.getloadavg()}")
    words = statistics.mean(len(t.split()) for t in texts)
    print(f"trained toxicity scorer, {len(texts)} benign-chat sentences ({words:.0f} words on average), "
          f"{args.rounds} rounds, 1 thread per call")  # fmt: skip
    for name in scorers:
        s = sorted(single[name])
        p99 = s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]
        print(f"  {name:<6} single p50 {statistics.median(s):6.2f} ms  p99 {p99:6.2f} ms   "
              f"32 per call {statistics.median(batched[name]):6.2f} ms per text (rounds: "
              f"{', '.join(f'{b:.2f}' for b in batched[name])})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
