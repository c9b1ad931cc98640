"""Cost of each guard per check (p50/p99), and of the keyword filter at 10, 1,000 and 100,000 terms.

    .venv/bin/python benchmarks/bench_guards.py [--n 200]

Uses the default policy with the alt-profanity-check scorer (the offline default). Single
checks, one at a time, on a quiet loop: this is per-check latency, not throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import string
import time

from guardrails.base import GuardContext, GuardResources, GuardSettings, Passage, make_executor
from guardrails.groundedness import GroundednessGuard
from guardrails.injection import InjectionGuard
from guardrails.keywords import KeywordGuard, KeywordMatcher, parse_terms
from guardrails.toxicity import ProfanityCheckScorer, ToxicityGuard

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


async def main(n: int, backend: str | None = None, model: str = "smollm2-135m-instruct") -> None:
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
    args = parser.parse_args()
    asyncio.run(main(args.n, args.backend, args.model))
