"""Per-text cost of the trained toxicity scorer on each MiniLM runtime, with and without the cascade
gate, single and batched, in one run; with --quality, what the gate changes in the figures.

    .venv/bin/python benchmarks/bench_trained_toxicity.py [--n 256] [--rounds 3] [--runtimes onnx,torch]
        [--quality]

For ONNX Runtime (retrieval's checked export, what `gateway serve` runs by default and what the
scorer shares from the embedder) and PyTorch (what the scorer loads itself when the gateway's
embedder is not the bundled MiniLM, e.g. the hashing embedder), both with one thread per call as
the gateway runs them, each with `gate = false` and `gate = true`: one text per call (p50/p99 ms)
and 32 texts per call (ms per text). The texts are the bundled benign chat set's sentences, which
is what the guard scores. Rounds alternate the configurations so that load from other jobs falls
on all alike; the load average is printed before and after. The share of texts the gate lets
skip MiniLM is printed for those sentences and for the Davidson test split.

--quality (ONNX only): P/R/F1 at the policy threshold (0.5) with the gate off and on, on the
Davidson test split, the labelled test split and the held-out look-alike family (the splits of
`gateway guards train-toxicity`, seed 0), and the benign chat set through the default policy's
guards (blocked/flagged prompts and answers), as `gateway eval guards --benign` counts them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from evals import train_toxicity as tt
from evals.guards import BENIGN_CHAT, eval_benign, read_benign
from evals.train_toxicity import training_encoder
from guardrails.policy import default_policy
from guardrails.sentences import split_sentences
from guardrails.toxicity import ProfanityCheckScorer
from guardrails.trained_toxicity import EmbedFn, TrainedToxicityScorer, profanity_logit


def benign_sentences() -> list[str]:
    """The bundled benign chat set's prompts and answers, split into sentences as the guard scores them."""
    out = []
    for item in read_benign(BENIGN_CHAT):
        for text in (item["prompt"], item["answer"]):
            out += [text[s:e] for s, e in split_sentences(text)]
    return out


def sentences(n: int) -> list[str]:
    out = benign_sentences()
    return (out * (n // max(1, len(out)) + 1))[:n]


def prf(scores: Sequence[float], gold: Sequence[int]) -> str:
    pred = np.array(scores) >= 0.5
    g = np.array(gold, dtype=bool)
    tp, fp, fn = int(np.sum(pred & g)), int(np.sum(pred & ~g)), int(np.sum(~pred & g))
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return f"P/R/F1 {p:.3f}/{r:.3f}/{f1:.3f} (tp {tp}, fp {fp}, fn {fn})"


def quality(embed: EmbedFn) -> None:
    """The gate's effect on the held-out figures and on the benign chat set, same encoder, same run."""
    off = TrainedToxicityScorer(embed=embed, gate=False)
    on = TrainedToxicityScorer(embed=embed, gate=True)
    cfg = tt.TrainConfig()
    _, _, d_test = tt._davidson(cfg)
    lab = tt._labelled(cfg)["test"]
    sets = {"davidson test": d_test, "labelled test": lab, "holdout": tt._holdout(cfg)}
    for name, split in sets.items():
        got = {}
        for label, scorer in (("off", off), ("on", on)):
            t0 = time.perf_counter()
            scores = [s["toxicity"] for s in scorer.score_batch(split.texts)]
            got[label] = (scores, (time.perf_counter() - t0) * 1000 / len(split.texts))
        full = np.array(got["off"][0]) >= 0.5
        kept = int(np.sum(full & (np.array(got["on"][0]) >= 0.5)))
        skip = 1.0 - float(on.gate_passes(split.texts).mean())
        print(f"  {name:<14} n={len(split.texts):<5} gate off {prf(got['off'][0], split.labels)} "
              f"{got['off'][1]:.2f} ms/text")  # fmt: skip
        print(f"  {'':<14} {'':<7} gate on  {prf(got['on'][0], split.labels)} {got['on'][1]:.2f} ms/text; "
              f"skips MiniLM {skip:.1%}; full scorer's positives kept {kept}/{int(full.sum())}")  # fmt: skip
    base = default_policy()
    for label, gate in (("off", False), ("on", True)):
        policy = replace(base, toxicity=replace(base.toxicity, gate=gate))
        scorer = TrainedToxicityScorer(embed=embed, gate=gate)
        r = asyncio.run(eval_benign(BENIGN_CHAT, policy, scorer))
        tox = r["by_guard"].get("toxicity", {})
        print(f"  benign chat (n={r['n']}) gate {label:<3}: input blocked {r['input_blocked']} flagged "
              f"{r['input_flagged']}, output blocked {r['output_blocked']} flagged {r['output_flagged']}; "
              f"toxicity guard {tox or 'no hits'}; p50 {r['ms_p50']:.1f} ms per item")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="texts per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per configuration")
    parser.add_argument("--runtimes", default="onnx,torch", help="comma-separated: onnx, torch")
    parser.add_argument("--quality", action="store_true", help="also P/R/F1 and benign blocks, gate off vs on")
    args = parser.parse_args()
    texts = sentences(args.n)
    scorers: dict[str, TrainedToxicityScorer] = {}
    encoders = {}
    for runtime in args.runtimes.split(","):
        embed, used, _ = training_encoder(runtime, threads=1)
        encoders[used] = embed
        for gate in (False, True):
            name = f"{used} gate {'on' if gate else 'off'}"
            scorers[name] = TrainedToxicityScorer(embed=embed, gate=gate)
            scorers[name].score_batch(texts[:32])  # warm up
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
        print(f"  {name:<14} single p50 {statistics.median(s):6.2f} ms  p99 {p99:6.2f} ms   "
              f"32 per call {statistics.median(batched[name]):6.2f} ms per text (rounds: "
              f"{', '.join(f'{b:.2f}' for b in batched[name])})")  # fmt: skip
    gated = next(s for n, s in scorers.items() if n.endswith("gate on"))
    _, _, d_test = tt._davidson(tt.TrainConfig())
    benign = benign_sentences()
    cascade = gated.gate
    assert cascade is not None, "the artefact has no gate.npz"
    logits = profanity_logit(np.array([s["toxicity"] for s in ProfanityCheckScorer().score_batch(benign)]))
    gate_ms, prof_ms = [], []
    profanity = ProfanityCheckScorer()
    for text, z in zip(benign, logits, strict=True):
        t0 = time.perf_counter()
        cascade.decision([text], np.array([z]))
        gate_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        profanity.score_batch([text])
        prof_ms.append((time.perf_counter() - t0) * 1000)
    print(f"one text per call: gate's hashed n-grams p50 {statistics.median(gate_ms):.3f} ms; profanity-check "
          f"(its feature, computed today for every text anyway) p50 {statistics.median(prof_ms):.3f} ms")  # fmt: skip
    print(f"skip MiniLM: benign-chat sentences {1 - gated.gate_passes(benign).mean():.1%} of {len(benign)}; "
          f"Davidson test tweets {1 - gated.gate_passes(d_test.texts).mean():.1%} of {len(d_test.texts)}")  # fmt: skip
    if args.quality:
        if "onnx" not in encoders:
            encoders["onnx"] = training_encoder("onnx", threads=1)[0]
        print("quality, gate off vs on (ONNX, 1 thread):")
        quality(encoders["onnx"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
