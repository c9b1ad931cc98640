"""Cost of each guard per check (p50/p99), of the trained toxicity scorer per text (single and
batched), and of the keyword filter at 10, 1,000 and 100,000 terms.

    .venv/bin/python benchmarks/bench_guards.py [--n 200] [--no-trained]

The guard table uses the alt-profanity-check scorer (the fallback) and, unless --no-trained, the
trained scorer (the default without a Detoxify checkpoint). Single checks, one at a time, on a
quiet loop: this is per-check latency, not throughput. The trained scorer's per-text cost is
measured on the bundled benign chat set's sentences: one text per call (p50/p99) and 32 per call
(total time / texts).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import string
import time

from guardrails.base import GuardContext, GuardResources, GuardSettings, Passage, make_executor
from guardrails.errors import ScorerUnavailable
from guardrails.groundedness import GroundednessGuard
from guardrails.injection import InjectionGuard
from guardrails.keywords import KeywordGuard, KeywordMatcher, parse_terms
from guardrails.toxicity import ProfanityCheckScorer, ToxicityGuard, ToxicityScorer
from guardrails.trained_toxicity import TrainedToxicityScorer, load_encoder

MESSAGE = (
    "Hello there, I would like to know how the quarterly revenue figures compare with last year, "
    "and whether the marketing budget should be increased for the next campaign in Europe and Asia."
)
ANSWER = (
    "The Eiffel Tower is 330 metres tall. It was completed in 1889 by the company of Gustave Eiffel. "
    "It stands on the Champ de Mars in Paris."
)
PASSAGES = (
    Passage(
        "p1",
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
        "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
        "from 1887 to 1889. The tower is 330 metres tall.",
    ),
    Passage("p2", "Paris is the capital and largest city of France, with about 2.1 million residents."),
)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


async def time_guard(guard, ctx: GuardContext, n: int) -> list[float]:
    await guard.check(ctx)  # warm-up
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await guard.check(ctx)
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def backend_times(url: str, model: str, requests: int) -> list[float]:
    """Milliseconds per non-streaming chat answer (64 tokens) from the backend itself."""
    from serving.vllm import VLLMBackend

    backend = VLLMBackend(url)
    body = {"model": model, "messages": [{"role": "user", "content": "How tall is the Eiffel Tower?"}],
            "max_tokens": 64, "temperature": 0}  # fmt: skip
    try:
        await backend.complete("/v1/chat/completions", body)  # warm-up
        ms = []
        for _ in range(requests):
            t0 = time.perf_counter()
            await backend.complete("/v1/chat/completions", body)
            ms.append((time.perf_counter() - t0) * 1000)
        return ms
    finally:
        await backend.aclose()


def sample_sentences(n: int) -> list[str]:
    """Sentences of the bundled benign chat set (prompts and answers), as the guard scores them."""
    from evals.guards import BENIGN_CHAT, read_benign
    from guardrails.sentences import split_sentences

    out = []
    for item in read_benign(BENIGN_CHAT):
        for text in (item["prompt"], item["answer"]):
            out += [text[s:e] for s, e in split_sentences(text)]
    return out[:n]


def bench_trained_scorer(n: int, threads: int | None) -> tuple[ToxicityScorer, str] | None:
    """Print the trained scorer's ms per text, single and batched; return it for the guard table."""
    try:
        embed = load_encoder(torch_threads=threads)
        scorer: ToxicityScorer = TrainedToxicityScorer(embed=embed)
    except ScorerUnavailable as exc:
        print(f"trained toxicity scorer not measured: {exc}")
        return None
    texts = sample_sentences(max(n, 64))
    scorer.score_batch(texts[:8])  # warm-up
    single = []
    for text in texts[:n]:
        t0 = time.perf_counter()
        scorer.score_batch([text])
        single.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    for start in range(0, len(texts), 32):
        scorer.score_batch(texts[start : start + 32])
    batched = (time.perf_counter() - t0) * 1000 / len(texts)
    words = sum(len(t.split()) for t in texts) / len(texts)
    print(f"trained toxicity scorer ({len(texts)} benign-chat sentences, {words:.0f} words on average, "
          f"torch threads {torch_threads()}):")  # fmt: skip
    print(f"  single text per call   p50 {pct(single, 50):7.2f} ms   p99 {pct(single, 99):7.2f} ms")
    print(f"  32 texts per call      {batched:7.2f} ms per text")
    print()
    return scorer, "toxicity (trained)"


def torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


async def main(
    n: int,
    backend: str | None = None,
    model: str = "smollm2-135m-instruct",
    trained: bool = True,
    threads: int | None = None,
) -> None:
    executor = make_executor(2)
    scorer = ProfanityCheckScorer()
    resources = GuardResources(executor=executor, toxicity_scorer=scorer)
    rng = random.Random(0)
    terms = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(5, 10))) for _ in range(1000)]
    guards = [
        (
            "keywords (1,000 terms)",
            KeywordGuard(GuardSettings(options={"terms": terms}), resources),
            GuardContext("input", MESSAGE),
        ),
        ("injection", InjectionGuard(GuardSettings(), resources), GuardContext("input", MESSAGE)),
        ("toxicity (alt-profanity-check)", ToxicityGuard(GuardSettings(), resources), GuardContext("output", ANSWER)),
        (
            "groundedness (lexical)",
            GroundednessGuard(GuardSettings(), resources),
            GuardContext("output", ANSWER, passages=PASSAGES, prompt="How tall is the Eiffel Tower?"),
        ),
    ]
    found = bench_trained_scorer(n, threads) if trained else None
    if found is not None:
        trained_resources = GuardResources(executor=executor, toxicity_scorer=found[0])
        guards.insert(3, (found[1], ToxicityGuard(GuardSettings(), trained_resources), GuardContext("output", ANSWER)))
    print(
        f"{'guard':<34} {'p50 ms':>8} {'p99 ms':>8}   (n={n}, {len(MESSAGE)}-char message, {len(ANSWER)}-char answer)"
    )
    for name, guard, ctx in guards:
        ms = await time_guard(guard, ctx, n)
        print(f"{name:<34} {pct(ms, 50):8.3f} {pct(ms, 99):8.3f}")
    executor.shutdown()
    if backend:
        ms = await backend_times(backend, model, 10)
        print(f"{'backend: ' + model + ' (64 tokens)':<34} {pct(ms, 50):8.1f} {pct(ms, 99):8.1f}   <- for scale")
    else:
        print("(pass --backend URL to print the backend's own time per answer next to these)")

    print()
    print(f"{'keyword filter terms':<22} {'build s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    all_terms = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 10))) for _ in range(100_000)]
    for count in (10, 1_000, 100_000):
        t0 = time.perf_counter()
        matcher = KeywordMatcher(parse_terms(all_terms[:count]))
        build = time.perf_counter() - t0
        matcher.find(MESSAGE)
        ms = []
        for _ in range(n):
            t0 = time.perf_counter()
            matcher.find(MESSAGE)
            ms.append((time.perf_counter() - t0) * 1000)
        print(f"{count:<22,} {build:8.2f} {pct(ms, 50):8.3f} {pct(ms, 99):8.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300, help="checks per measurement")
    parser.add_argument("--backend", default=None, help="a vLLM URL, to show its time per answer for scale")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the backend model")
    parser.add_argument("--no-trained", action="store_true", help="leave out the trained toxicity scorer")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch threads for the encoder (default: torch's own)"
    )
    args = parser.parse_args()
    asyncio.run(main(args.n, args.backend, args.model, not args.no_trained, args.torch_threads))
