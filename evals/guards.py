"""`gateway eval guards`: measure the guards on labelled data.

    --groundedness FILE.jsonl   HaluEval QA lines (knowledge, question, right_answer,
                                hallucinated_answer): both answers are checked against the
                                knowledge; positive class = hallucinated (not grounded).
                                With --split: a seeded fit half and held-out half, the
                                sentence threshold chosen on the fit half only.
    --toxicity FILE.csv         `text,label` (1 = toxic) or the Davidson et al. CSV as is
                                (`class` 0/1 toxic, 2 not; text in `tweet`).
    --injection                 the 15 prompts of jailbreak-corpus-mini-py (all attacks) plus
                                the benign prompts in guardrails/benign_prompts.txt.
    --benign [FILE.jsonl]       benign chat (`prompt`, `answer`, optional `kind`; default
                                guardrails/datasets/benign_chat.jsonl) through the policy's input
                                guards (the prompt as a user message) and output guards (the
                                answer): block and flag rates per stage and per guard, and
                                every text that was blocked or flagged.

Each prints a table (accuracy, precision, recall, F1, ms per check p50/p99); `--json` adds one
JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import guardrails
from guardrails.base import GuardContext, GuardResources, GuardSettings, Passage, Verdict, make_executor
from guardrails.engine import Guardrails
from guardrails.errors import GuardrailsError
from guardrails.groundedness import GroundednessGuard
from guardrails.injection import score_injection
from guardrails.policy import Policy, default_policy, load_policy
from guardrails.toxicity import DETOXIFY_MODEL_TYPES, SCORER_KINDS, ToxicityConfig, ToxicityScorer, build_scorer

if TYPE_CHECKING:
    from gateway.settings import Settings

BENIGN_PROMPTS = Path(guardrails.__file__).resolve().parent / "benign_prompts.txt"
BENIGN_CHAT = Path(guardrails.__file__).resolve().parent / "datasets" / "benign_chat.jsonl"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `eval guards` options to `parser`."""
    parser.add_argument("--groundedness", metavar="FILE.jsonl", help="HaluEval QA file to score")
    parser.add_argument("--toxicity", metavar="FILE.csv", help="text,label CSV or the Davidson CSV")
    parser.add_argument(
        "--injection",
        action="store_true",
        help="score the jailbreak-corpus-mini-py prompts plus the bundled benign prompts",
    )
    parser.add_argument(
        "--benign",
        nargs="?",
        const=str(BENIGN_CHAT),
        metavar="FILE.jsonl",
        help="benign prompts and answers: block and flag rates of the policy (default file: the bundled set)",
    )
    parser.add_argument(
        "--policy", metavar="FILE", help="policy TOML (thresholds, scorer config; default: the policy setting)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N", help="use at most N items per data set (toxicity default: 2000)"
    )
    parser.add_argument(
        "--sample",
        choices=("random", "head"),
        default="random",
        help="how --limit picks items (default random, seeded)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--halves", action="store_true", help="groundedness: also report the even and odd halves separately"
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="groundedness: split the items in two with --seed (fit half, held-out half); pick the sentence "
        "threshold that scores best on the fit half only and report both halves at it and at the policy's",
    )
    parser.add_argument("--toxicity-scorer", choices=SCORER_KINDS, default=None)
    parser.add_argument(
        "--trained-model", metavar="DIR", help="trained scorer folder (default: the head shipped in the package)"
    )
    parser.add_argument(
        "--encoder-runtime",
        choices=("auto", "onnx", "torch"),
        default="auto",
        help="where the trained scorer runs MiniLM, as `gateway serve`'s embedding_runtime (default auto: "
        "retrieval's checked ONNX export, else PyTorch)",
    )
    parser.add_argument("--detoxify-checkpoint", metavar="PATH")
    parser.add_argument("--detoxify-model-type", choices=DETOXIFY_MODEL_TYPES)
    parser.add_argument(
        "--huggingface-config-dir",
        metavar="DIR",
        help="local folder with the HF config and tokenizer files for Detoxify",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def metrics(pred: Sequence[bool], gold: Sequence[bool], ms: Sequence[float]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 (positive = flagged) and latency percentiles."""
    tp = sum(p and g for p, g in zip(pred, gold, strict=True))
    fp = sum(p and not g for p, g in zip(pred, gold, strict=True))
    fn = sum(g and not p for p, g in zip(pred, gold, strict=True))
    tn = len(pred) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": len(pred),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "accuracy": (tp + tn) / len(pred) if pred else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "ms_p50": _percentile(ms, 50),
        "ms_p99": _percentile(ms, 99),
    }


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _pick(items: list[Any], limit: int | None, how: str, seed: int) -> list[Any]:
    if limit is None or limit >= len(items):
        return items
    if how == "head":
        return items[:limit]
    return random.Random(seed).sample(items, limit)


# ------------------------------------------------------------------------- groundedness


def read_halueval(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


async def _check_halueval(
    guard: GroundednessGuard, rows: list[dict[str, Any]]
) -> tuple[list[bool], list[bool], list[float]]:
    """(flagged, hallucinated, ms) for both answers of every row, right answer first."""
    preds: list[bool] = []
    gold: list[bool] = []
    ms: list[float] = []
    for i, r in enumerate(rows):
        passages = (Passage(f"k{i}", r["knowledge"]),)
        for answer, hallucinated in ((r["right_answer"], False), (r["hallucinated_answer"], True)):
            ctx = GuardContext(stage="output", text=answer, passages=passages, prompt=r["question"])
            t0 = time.perf_counter()
            verdict = await guard.check(ctx)
            ms.append((time.perf_counter() - t0) * 1000)
            preds.append(verdict.hit)
            gold.append(hallucinated)
    return preds, gold, ms


#: Sentence thresholds `--split` chooses from (on the fit half only).
SPLIT_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(11))


def split_halves(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Row indexes of the fit half and the held-out half: a seeded shuffle cut in two."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[: n // 2]), sorted(order[n // 2 :])


async def _eval_split(
    settings: GuardSettings, resources: GuardResources, rows: list[dict[str, Any]], seed: int
) -> dict[str, Any]:
    """Pick the sentence threshold on the fit half; report both halves at it and at the policy's."""
    fit_idx, held_idx = split_halves(len(rows), seed)
    fit_rows, held_rows = [rows[i] for i in fit_idx], [rows[i] for i in held_idx]
    policy_threshold = GroundednessGuard(settings, resources).thresholds["sentence"]
    scores: dict[float, float] = {}
    for t in SPLIT_THRESHOLDS:
        guard = GroundednessGuard(replace(settings, thresholds={**settings.thresholds, "sentence": t}), resources)
        scores[t] = metrics(*await _check_halueval(guard, fit_rows))["accuracy"]
    # best on the fit half; ties go to the lower threshold (it flags less of real, paraphrasing answers)
    fitted = max(SPLIT_THRESHOLDS, key=lambda t: (scores[t], -t))
    out: dict[str, Any] = {"seed": seed, "fit_items": len(fit_rows), "held_out_items": len(held_rows)}
    out["fit_accuracy_by_threshold"] = {str(t): round(a, 4) for t, a in scores.items()}
    for label, t in (("fitted", fitted), ("policy", policy_threshold)):
        guard = GroundednessGuard(replace(settings, thresholds={**settings.thresholds, "sentence": t}), resources)
        out[label] = {
            "threshold": t,
            "fit_half": metrics(*await _check_halueval(guard, fit_rows)),
            "held_out_half": metrics(*await _check_halueval(guard, held_rows)),
        }
    return out


async def eval_groundedness(
    path: Path, policy: Policy, limit: int | None, how: str, seed: int, halves: bool, split: bool = False
) -> dict[str, Any]:
    rows = read_halueval(path)
    for i, r in enumerate(rows):
        missing = {"knowledge", "question", "right_answer", "hallucinated_answer"} - set(r)
        if missing:
            raise ValueError(f"{path}:{i + 1}: missing field(s) {sorted(missing)}")
    rows = _pick(rows, limit, how, seed)
    settings = replace(policy.for_request().guards["groundedness"], action="flag")
    executor = make_executor(1)
    try:
        resources = GuardResources(executor=executor)
        guard = GroundednessGuard(settings, resources)
        preds, gold, ms = await _check_halueval(guard, rows)
        split_result = await _eval_split(settings, resources, rows, seed) if split else None
    finally:
        executor.shutdown()
    result: dict[str, Any] = {
        "file": str(path),
        "positive": "hallucinated",
        "method": guard.mode,
        "threshold": guard.thresholds["sentence"],
        **metrics(preds, gold, ms),
    }
    if halves:
        for name, parity in (("even_half", 0), ("odd_half", 1)):
            idx = [j for j in range(len(preds)) if (j // 2) % 2 == parity]
            result[name] = metrics([preds[j] for j in idx], [gold[j] for j in idx], [ms[j] for j in idx])
    if split_result is not None:
        result["split"] = split_result
    return result


# ------------------------------------------------------------------------- toxicity


def read_toxicity_csv(path: Path) -> list[tuple[str, bool]]:
    """(text, toxic) pairs from `text,label` or the Davidson CSV."""
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        fields = set(reader.fieldnames or ())
        if {"text", "label"} <= fields:
            return [(row["text"], str(row["label"]).strip() in ("1", "true", "True")) for row in reader]
        if {"class", "tweet"} <= fields:
            return [(row["tweet"], row["class"].strip() in ("0", "1")) for row in reader]
    raise ValueError(f"{path}: expected columns text,label or the Davidson columns class,tweet; got {sorted(fields)}")


def eval_toxicity(
    path: Path, scorer: ToxicityScorer, policy: Policy, limit: int | None, how: str, seed: int
) -> dict[str, Any]:
    items = _pick(read_toxicity_csv(path), limit if limit is not None else 2000, how, seed)
    thresholds = {**_tox_defaults(), **policy.for_request().guards["toxicity"].thresholds}
    preds: list[bool] = []
    ms: list[float] = []
    batch = 32
    batched_ms = 0.0
    for start in range(0, len(items), batch):
        chunk = [t for t, _ in items[start : start + batch]]
        t0 = time.perf_counter()
        scores = scorer.score_batch(chunk)
        batched_ms += (time.perf_counter() - t0) * 1000
        for sc in scores:
            preds.append(any(v >= thresholds.get(c, 1.1) for c, v in sc.items()))
    # single-text latency (what one unbatched check costs) on up to 200 items
    for text, _ in items[:200]:
        t0 = time.perf_counter()
        scorer.score_batch([text])
        ms.append((time.perf_counter() - t0) * 1000)
    gold = [g for _, g in items]
    result = {
        "file": str(path),
        "positive": "toxic",
        "scorer": scorer.describe(),
        "thresholds": {k: v for k, v in thresholds.items() if k in scorer.categories},
        **metrics(preds, gold, ms),
        "ms_per_text_batched": batched_ms / max(1, len(items)),
    }
    result["toxic_share"] = sum(gold) / max(1, len(gold))
    return result


def _toxicity_config(args: argparse.Namespace, policy: Policy) -> ToxicityConfig:
    """The policy's [scorers.toxicity] with the command line's overrides."""
    overrides = {
        k: v
        for k, v in {
            "scorer": args.toxicity_scorer,
            "checkpoint": args.detoxify_checkpoint,
            "model_type": args.detoxify_model_type,
            "huggingface_config_dir": args.huggingface_config_dir,
            "trained_model": args.trained_model,
        }.items()
        if v is not None
    }
    return replace(policy.toxicity, **overrides)


def _trained_encoder(config: ToxicityConfig, runtime: str) -> tuple[Any, str | None]:
    """MiniLM for the trained scorer on `runtime` with one thread per call, as the gateway runs
    it, and the runtime used ((None, None) where the configuration does not pick the trained scorer)."""
    if config.scorer not in ("auto", "trained") or (config.scorer == "auto" and config.checkpoint):
        return None, None
    from evals.train_toxicity import training_encoder

    embed, used, _key = training_encoder("onnx" if runtime == "onnx" else "torch" if runtime == "torch" else "auto", 1)
    return embed, used


def _tox_defaults() -> dict[str, float]:
    from guardrails.toxicity import ToxicityGuard

    return dict(ToxicityGuard.default_thresholds)


# ------------------------------------------------------------------------- benign chat


def read_benign(path: Path) -> list[dict[str, str]]:
    """`{"prompt", "answer", "kind"?}` lines; a line without prompt or answer is an error."""
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not JSON: {exc}") from None
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("prompt"), str)
            or not isinstance(item.get("answer"), str)
        ):
            raise ValueError(f"{path}:{i}: expected an object with string fields prompt and answer")
        items.append({"prompt": item["prompt"], "answer": item["answer"], "kind": str(item.get("kind", ""))})
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _hits(verdicts: Sequence[Verdict], action: str) -> list[str]:
    return sorted({v.guard for v in verdicts if v.action == action})


async def eval_benign(path: Path, policy: Policy, scorer: ToxicityScorer | None) -> dict[str, Any]:
    """Every prompt through the input guards and every answer through the output guards of the
    policy, as the gateway runs them (one user message; the answer without passages)."""
    items = read_benign(path)
    executor = make_executor(2)
    try:
        rails = await Guardrails.load(policy, executor, toxicity_scorer=scorer)
        counts = {f"{stage}_{what}": 0 for stage in ("input", "output") for what in ("blocked", "flagged")}
        by_guard: dict[str, dict[str, int]] = {}
        hits: list[dict[str, Any]] = []
        ms: list[float] = []
        for item in items:
            t0 = time.perf_counter()
            inp = await rails.check_input([{"role": "user", "content": item["prompt"]}])
            out = await rails.check_output(item["answer"], prompt=item["prompt"])
            ms.append((time.perf_counter() - t0) * 1000)
            for stage, verdicts in (("input", inp.verdicts), ("output", out.verdicts)):
                blocked, flagged = _hits(verdicts, "block"), _hits(verdicts, "flag")
                counts[f"{stage}_blocked"] += bool(blocked)
                counts[f"{stage}_flagged"] += bool(flagged)
                for guard in blocked + flagged:
                    what = "blocked" if guard in blocked else "flagged"
                    per = by_guard.setdefault(guard, {})
                    per[f"{stage}_{what}"] = per.get(f"{stage}_{what}", 0) + 1
                if blocked or flagged:
                    scores = {v.guard: round(v.score, 3) for v in verdicts if v.hit}
                    text = item["prompt"] if stage == "input" else item["answer"]
                    hits.append({"stage": stage, "kind": item["kind"], "blocked": blocked, "flagged": flagged,
                                 "scores": scores, "text": text})  # fmt: skip
        described = rails.describe()
    finally:
        executor.shutdown()
    n = len(items)
    return {
        "file": str(path),
        "n": n,
        "toxicity_scorer": (described["toxicity_scorer"] or {}).get("scorer"),
        **counts,
        **{f"{k}_rate": round(v / n, 4) for k, v in counts.items()},
        "by_guard": by_guard,
        "ms_p50": _percentile(ms, 50),
        "ms_p99": _percentile(ms, 99),
        "hits": hits,
    }


# ------------------------------------------------------------------------- injection


def eval_injection(policy: Policy) -> dict[str, Any]:
    try:
        from jailbreak_corpus_mini import load_corpus
    except ImportError as exc:
        raise ValueError("--injection needs the package jailbreak-corpus-mini-py") from exc
    threshold = {"score": 0.5, **policy.for_request().guards["injection"].thresholds}["score"]
    attacks = [f.prompt for f in load_corpus()]
    benign = [
        ln.strip()
        for ln in BENIGN_PROMPTS.read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    preds: list[bool] = []
    ms: list[float] = []
    missed: list[str] = []
    false_alarms: list[str] = []
    for text, is_attack in [(a, True) for a in attacks] + [(b, False) for b in benign]:
        t0 = time.perf_counter()
        score = score_injection(text).score
        ms.append((time.perf_counter() - t0) * 1000)
        preds.append(score >= threshold)
        if is_attack and score < threshold:
            missed.append(text)
        if not is_attack and score >= threshold:
            false_alarms.append(text)
    gold = [True] * len(attacks) + [False] * len(benign)
    return {
        "attacks": len(attacks),
        "benign": len(benign),
        "threshold": threshold,
        **metrics(preds, gold, ms),
        "missed": missed,
        "false_alarms": false_alarms,
    }


# ------------------------------------------------------------------------- CLI


def _table(title: str, m: dict[str, Any]) -> str:
    return (
        f"{title:<28} n={m['n']:<6} acc={m['accuracy']:.3f}  P={m['precision']:.3f}  "
        f"R={m['recall']:.3f}  F1={m['f1']:.3f}  ms p50={m['ms_p50']:.3f} p99={m['ms_p99']:.3f}"
    )


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Run the requested evaluations; 0 on success, 2 on bad input. The policy is the `policy`
    setting (gateway.cli puts `--policy` there); without settings, `--policy` itself."""
    if not (args.groundedness or args.toxicity or args.injection or args.benign):
        print(
            "eval guards: give --groundedness FILE, --toxicity FILE, --benign [FILE] and/or --injection",
            file=sys.stderr,
        )
        return 2
    policy_path = settings.policy if settings is not None else args.policy
    try:
        policy = load_policy(policy_path) if policy_path else default_policy()
        report: dict[str, Any] = {}
        if args.groundedness:
            g = asyncio.run(
                eval_groundedness(
                    Path(args.groundedness), policy, args.limit, args.sample, args.seed, args.halves, args.split
                )
            )
            report["groundedness"] = g
            print(f"groundedness ({g['method']}, sentence threshold {g['threshold']}), positive = hallucinated answer")
            print(_table("  all", g))
            for half in ("even_half", "odd_half"):
                if half in g:
                    print(_table(f"  {half}", g[half]))
            if "split" in g:
                sp = g["split"]
                print(
                    f"  split (seed {sp['seed']}): {sp['fit_items']} fit items, {sp['held_out_items']} held out; "
                    f"threshold fitted on the fit half: {sp['fitted']['threshold']}"
                )
                for label in ("fitted", "policy"):
                    t = sp[label]["threshold"]
                    print(_table(f"  fit half @ {t} ({label})", sp[label]["fit_half"]))
                    print(_table(f"  held-out half @ {t} ({label})", sp[label]["held_out_half"]))
        scorer: ToxicityScorer | None = None
        if args.toxicity or (args.benign and policy.uses_toxicity()):
            config = _toxicity_config(args, policy)
            embed, runtime = _trained_encoder(config, args.encoder_runtime)
            scorer = build_scorer(config, embed=embed)
        if args.toxicity:
            assert scorer is not None
            t = eval_toxicity(Path(args.toxicity), scorer, policy, args.limit, args.sample, args.seed)
            t["encoder_runtime"] = runtime if t["scorer"].get("scorer") == "trained" else None
            report["toxicity"] = t
            on = f" on {runtime}" if t["encoder_runtime"] else ""
            print(
                f"toxicity ({t['scorer']['scorer']}{on}), positive = toxic; share toxic {t['toxic_share']:.3f}; "
                f"batched {t['ms_per_text_batched']:.3f} ms/text; latency = single-text calls"
            )
            print(_table("  all", t))
        if args.benign:
            b = asyncio.run(eval_benign(Path(args.benign), policy, scorer))
            report["benign"] = b
            print(
                f"benign chat ({b['n']} prompts and answers; toxicity scorer {b['toxicity_scorer']}), {policy.source}"
            )
            for stage in ("input", "output"):
                print(f"  {stage:<7} blocked {b[f'{stage}_blocked']:>3} ({b[f'{stage}_blocked_rate']:.1%})  "
                      f"flagged {b[f'{stage}_flagged']:>3} ({b[f'{stage}_flagged_rate']:.1%})")  # fmt: skip
            for hit in b["hits"]:
                what = "BLOCKED" if hit["blocked"] else "flagged"
                guards_hit = ",".join(hit["blocked"] + hit["flagged"])
                print(f"  {what} {hit['stage']:<6} {guards_hit:<14} {hit['scores']} {hit['text'][:80]!r}")
        if args.injection:
            i = eval_injection(policy)
            report["injection"] = i
            print(f"injection (threshold {i['threshold']}): {i['attacks']} attacks, {i['benign']} benign")
            print(_table("  all", i))
            for text in i["missed"]:
                print(f"  missed:      {text[:90]!r}")
            for text in i["false_alarms"]:
                print(f"  false alarm: {text[:90]!r}")
    except (OSError, ValueError, GuardrailsError) as exc:
        print(f"eval guards: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gateway eval guards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
