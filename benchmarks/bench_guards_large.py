"""Cost of the keyword and injection guards on 900 KB prompts (prose and adversarial) and on the
186-character message of `bench_guards.py`, for this tree and, optionally, an older one.

    .venv/bin/python benchmarks/bench_guards_large.py [--before /tmp/guards-before] [--n 300]

`--before DIR` is a checkout of an earlier commit (`git worktree add /tmp/guards-before REV`):
its `guardrails` package is timed in a child process, next to this tree's, so one run prints
both. Each large input is timed once per guard (the time is seconds of pure Python, not noise);
the short message is timed `--n` times (p50 / p99 in ms). The keyword guard holds the same
1,000 random terms as `bench_guards.py`, plus a few phrases.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import subprocess
import sys
import time
from pathlib import Path

SIZE = 900_000
MESSAGE = (
    "Hello there, I would like to know how the quarterly revenue figures compare with last year, "
    "and whether the marketing budget should be increased for the next campaign in Europe and Asia."
)
_PROSE = (
    "The committee met on Tuesday to review the quarterly figures. Revenue rose by 4.2% against "
    "last year, driven mostly by the new subscription tier; costs were flat. Ms. Alvarez asked "
    "whether the marketing budget for Europe and Asia should grow, and the board agreed to revisit "
    "it in March. Minutes: see the shared folder (e.g. report-2024-q3.pdf). Next meeting: 10:30.\n"
)
_ACCENTED = "Le comité s'est réuni mardi; l'équipe a présenté les résultats trimestriels à Zürich. "


def _fill(unit: str) -> str:
    return (unit * (SIZE // len(unit) + 1))[:SIZE]


def _letters() -> str:
    rng = random.Random(1)
    return " ".join(rng.choice(string.ascii_lowercase) for _ in range(SIZE // 2))[:SIZE]


INPUTS: dict[str, object] = {
    "prose (ASCII)": lambda: _fill(_PROSE),
    "prose (accented)": lambda: _fill(_ACCENTED),
    "'<!-- ai ' x N": lambda: _fill("<!-- ai "),
    "'a ' x N": lambda: _fill("a "),
    "'%41' x N": lambda: _fill("%41"),
    "'&#108;' x N": lambda: _fill("&#108;"),
    "single letters + spaces": _letters,
    "'a1 ' x N (leet)": lambda: _fill("a1 "),
}


def _terms() -> list[str]:
    rng = random.Random(0)
    terms = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(5, 10))) for _ in range(1000)]
    return [*terms, "bad word", "quarterly secret", "zorblax"]


def measure(n: int) -> dict[str, object]:
    """Time this interpreter's `guardrails` (whatever `sys.path` finds first)."""
    import asyncio

    from guardrails.base import GuardContext, GuardResources, GuardSettings, make_executor
    from guardrails.injection import InjectionGuard
    from guardrails.keywords import KeywordGuard

    executor = make_executor(2)
    resources = GuardResources(executor=executor)
    guards = {
        "keywords": KeywordGuard(GuardSettings(options={"terms": _terms()}), resources),
        "injection": InjectionGuard(GuardSettings(), resources),
    }

    async def run() -> dict[str, object]:
        out: dict[str, object] = {"large": {}, "short": {}}
        for name, guard in guards.items():
            await guard.check(GuardContext("input", MESSAGE[:-1] + "!"))  # warm-up
            ms = []
            for _ in range(n):
                text = "".join([MESSAGE])  # a fresh object each time: no per-text cache hit
                t0 = time.perf_counter()
                await guard.check(GuardContext("input", text))
                ms.append((time.perf_counter() - t0) * 1000)
            ms.sort()
            out["short"][name] = (ms[len(ms) // 2], ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))])
        for label, make in INPUTS.items():
            text = make()
            row = {}
            for name, guard in guards.items():
                fresh = text[:-1] + text[-1]  # a new object per guard: each pays its own normalisation
                t0 = time.perf_counter()
                await guard.check(GuardContext("input", fresh))
                row[name] = time.perf_counter() - t0
            # both guards on one text, as the pipeline runs them (concurrently)
            fresh = text[:-1] + text[-1]
            t0 = time.perf_counter()
            await asyncio.gather(*(g.check(GuardContext("input", fresh)) for g in guards.values()))
            row["both"] = time.perf_counter() - t0
            out["large"][label] = row
        return out

    try:
        return asyncio.run(run())
    finally:
        executor.shutdown()


def _child(root: str, n: int) -> dict[str, object]:
    code = (
        f"import sys, json; sys.path.insert(0, {root!r}); sys.path.insert(1, {str(Path(__file__).parent)!r}); "
        f"import bench_guards_large as b; print(json.dumps(b.measure({n})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", default=None, help="a checkout of an earlier commit, timed too")
    parser.add_argument("--n", type=int, default=300, help="checks of the short message")
    args = parser.parse_args()
    root = str(Path(__file__).resolve().parent.parent)
    results = {"now": _child(root, args.n)}
    if args.before:
        results["before"] = _child(args.before, args.n)
    cols = [k for k in ("before", "now") if k in results]
    head = "  ".join(f"{c + ' ' + g:>16}" for g in ("keywords", "injection", "both") for c in cols)
    print(f"900 KB inputs, seconds per check (2 guards; 'both' = concurrently on one text)\n{'input':<26}{head}")
    for label in INPUTS:
        cells = "  ".join(
            f"{results[c]['large'][label][g]:16.3f}" for g in ("keywords", "injection", "both") for c in cols
        )
        print(f"{label:<26}{cells}")
    print(f"\n{len(MESSAGE)}-character message, ms per check (p50 / p99, n={args.n})")
    for g in ("keywords", "injection"):
        cells = "  ".join(f"{c}: {results[c]['short'][g][0]:.3f} / {results[c]['short'][g][1]:.3f}" for c in cols)
        print(f"{g:<26}{cells}")


if __name__ == "__main__":
    main()
