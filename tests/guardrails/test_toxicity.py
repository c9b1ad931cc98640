"""Toxicity: one contract suite over both scorers, Detoxify's real loading path with a tiny
checkpoint, scorer selection, the guard's thresholds and cross-request batching."""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path

import pytest

from guardrails.base import GuardContext, GuardResources, GuardSettings
from guardrails.errors import ScorerUnavailable
from guardrails.toxicity import (
    BatchingScorer,
    DetoxifyScorer,
    ProfanityCheckScorer,
    ToxicityConfig,
    ToxicityGuard,
    ToxicityScorer,
    build_scorer,
)

from .conftest import DAVIDSON, TINY_BIASES, sigmoid


@pytest.fixture(params=["profanity-check", pytest.param("detoxify", marks=pytest.mark.slow)])
def scorer(request: pytest.FixtureRequest) -> ToxicityScorer:
    name = "profanity_scorer" if request.param == "profanity-check" else "detoxify_scorer"
    return request.getfixturevalue(name)


def test_contract_scores_every_text_in_order(scorer: ToxicityScorer):
    texts = ["Have a nice day", "You are a stupid idiot", "", "Another one, much longer " * 20]
    out = scorer.score_batch(texts)
    assert len(out) == len(texts)
    for scores in out:
        assert set(scores) == set(scorer.categories)
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert scorer.score_batch([]) == []
    assert scorer.score_batch(["one"]) and len(scorer.score_batch(["one"])) == 1
    assert scorer.describe()["categories"] == list(scorer.categories)


def test_profanity_check_separates_toxic_from_friendly(profanity_scorer: ProfanityCheckScorer):
    toxic, friendly = profanity_scorer.score_batch(["You are a stupid idiot", "Have a nice day"])
    assert toxic["toxicity"] > 0.9 and friendly["toxicity"] < 0.2
    assert profanity_scorer.describe()["scorer"] == "alt-profanity-check"


@pytest.mark.slow  # loads torch and transformers (several seconds)
def test_detoxify_loads_the_checkpoint_weights(detoxify_scorer: DetoxifyScorer):
    # Detoxify's names are standardised (toxic -> toxicity, identity_hate -> identity_attack)
    assert detoxify_scorer.categories == (
        "toxicity",
        "severe_toxicity",
        "obscene",
        "threat",
        "insult",
        "identity_attack",
        "sexual_explicit",
    )
    # the classifier's weights are zero and its biases known: the scores prove the state dict loaded
    (scores,) = detoxify_scorer.score_batch(["anything at all"])
    for category, bias in zip(detoxify_scorer.categories, TINY_BIASES, strict=True):
        assert scores[category] == pytest.approx(sigmoid(bias), abs=1e-5)
    assert detoxify_scorer.describe()["scorer"] == "detoxify"


@pytest.mark.slow  # loads torch and transformers (several seconds)
def test_detoxify_errors_are_clear(tmp_path: Path, tiny_detoxify_files: tuple[Path, Path]):
    with pytest.raises(ScorerUnavailable, match="does not exist"):
        DetoxifyScorer("original", str(tmp_path / "missing.ckpt"), str(tmp_path))
    with pytest.raises(ScorerUnavailable, match="unknown Detoxify model type"):
        DetoxifyScorer("gigantic", str(tiny_detoxify_files[0]))
    bad = tmp_path / "bad.ckpt"
    import torch

    torch.save({"weights": {}}, bad)
    with pytest.raises(ScorerUnavailable, match="not a Detoxify checkpoint"):
        DetoxifyScorer("original", str(bad), str(tiny_detoxify_files[1]))


@pytest.mark.slow  # loads torch and transformers (several seconds)
def test_build_scorer_picks_by_configuration(tiny_detoxify_files: tuple[Path, Path]):
    assert build_scorer(ToxicityConfig()).describe()["scorer"] == "trained"  # no checkpoint: the shipped head
    ckpt, hf_dir = tiny_detoxify_files
    chosen = build_scorer(
        ToxicityConfig(checkpoint=str(ckpt), huggingface_config_dir=str(hf_dir), model_type="unbiased-small")
    )
    assert isinstance(chosen, DetoxifyScorer) and chosen.name == "detoxify:unbiased-small"
    forced = build_scorer(ToxicityConfig(scorer="profanity-check", checkpoint=str(ckpt)))
    assert isinstance(forced, ProfanityCheckScorer)


@pytest.mark.slow  # loads torch and transformers (several seconds)
async def test_guard_per_category_thresholds(executor, detoxify_scorer: DetoxifyScorer):
    # tiny model: toxicity = sigmoid(3) ~ 0.95, insult = sigmoid(2) ~ 0.88, the rest ~ 0.05
    resources = GuardResources(executor=executor, toxicity_scorer=detoxify_scorer)
    text = "First sentence. Second sentence."
    lenient = ToxicityGuard(GuardSettings(thresholds={"toxicity": 0.99, "insult": 0.99}), resources)
    assert (await lenient.check(GuardContext(stage="output", text=text))).allowed
    insult_only = ToxicityGuard(GuardSettings(thresholds={"toxicity": 0.99, "insult": 0.8}), resources)
    v = await insult_only.check(GuardContext(stage="output", text=text))
    assert not v.allowed and v.details["categories"] == ["insult"]
    assert v.spans == ((0, 15), (16, 32)) and v.ms > 0


async def test_guard_flags_only_the_toxic_sentence(executor, profanity_scorer: ProfanityCheckScorer):
    resources = GuardResources(executor=executor, toxicity_scorer=profanity_scorer)
    guard = ToxicityGuard(GuardSettings(action="redact"), resources)
    text = "Thanks for asking. You are a stupid idiot. Have a nice day."
    v = await guard.check(GuardContext(stage="output", text=text))
    assert v.action == "redact" and v.spans == ((19, 42),)
    assert v.redacted_text == "Thanks for asking. *** *** * ****** ****** Have a nice day."


async def test_concurrent_checks_share_one_model_call(executor, profanity_scorer: ProfanityCheckScorer):
    resources = GuardResources(executor=executor)
    batcher = BatchingScorer(profanity_scorer, resources, max_batch=64, max_wait_ms=20)
    results = await asyncio.gather(*(batcher.score([f"text number {i}", "you idiot"]) for i in range(10)))
    # Adaptive batching: the first caller goes at once (no wait at low load); the nine who
    # arrive while it runs share the next call. Without batching this would be 10 calls.
    assert batcher.batches == 2
    assert all(len(r) == 2 and r[1]["toxicity"] > 0.5 for r in results)


def test_guard_without_a_scorer_fails_at_construction(executor):
    with pytest.raises(ScorerUnavailable):
        ToxicityGuard(GuardSettings(), GuardResources(executor=executor))


@pytest.mark.skipif(not DAVIDSON.is_file(), reason=f"Davidson toxicity data not found at {DAVIDSON}")
def test_profanity_check_on_a_davidson_sample(profanity_scorer: ProfanityCheckScorer):
    with DAVIDSON.open(encoding="utf-8", newline="") as fh:
        rows = [r for _, r in zip(range(400), csv.DictReader(fh), strict=False)]
    scores = profanity_scorer.score_batch([r["tweet"] for r in rows])
    correct = sum((s["toxicity"] >= 0.5) == (r["class"] in ("0", "1")) for s, r in zip(scores, rows, strict=True))
    assert correct / len(rows) > 0.85


def test_direct_linear_scoring_equals_the_packages_predict_prob() -> None:
    from profanity_check import predict_prob

    from guardrails.toxicity import ProfanityCheckScorer

    scorer = ProfanityCheckScorer()
    assert scorer._linear is not None  # the fast path is in use with this package version
    texts = [
        "Have a nice day",
        "You are a stupid idiot",
        "",
        "the quick brown fox jumps over the lazy dog " * 20,
        "what the hell is this shit",
        "I will find you and hurt you",
        "Paris is the capital of France.",
        "the and of it",  # stop words only: no features
        "zzqx qqzz",  # words outside the vocabulary
        "FUCK fuck FuCk!!! Ümlaut naïve 東京 idiot_face x2",
        "   ",
    ]
    with DAVIDSON.open(encoding="utf-8", newline="") as fh:
        texts += [r["tweet"] for _, r in zip(range(300), csv.DictReader(fh), strict=False)]
    reference = [float(p) for p in predict_prob(texts)]
    assert scorer._direct is not None  # the TF-IDF is computed without scikit-learn
    fast = [s["toxicity"] for s in scorer.score_batch(texts)]
    assert fast == pytest.approx(reference, abs=1e-9)
    one_by_one = [scorer.score_batch([t])[0]["toxicity"] for t in texts[:20]]
    assert one_by_one == pytest.approx(reference[:20], abs=1e-9)


class _FixedScorer(ToxicityScorer):
    """A fake scorer (for speed): each text's score is the number it ends with, in hundredths."""

    name = "fixed"
    categories = ("toxicity",)

    def score_batch(self, texts):
        return [{"toxicity": int(t.rstrip(".").split()[-1]) / 100} for t in texts]

    def describe(self):
        return {"scorer": "fixed"}


async def test_block_above_flags_the_lower_tier(executor):
    """Two tiers on a blocking stage: from the threshold up to block_above a hit is flagged (kept,
    reviewable), from block_above up it blocks; input keeps its own input_action."""
    from guardrails.policy import parse_policy

    policy = parse_policy("[guards.toxicity]\nblock_above = 0.8\n")
    settings = policy.for_request().guards["toxicity"]
    guard = ToxicityGuard(settings, GuardResources(executor=executor, toxicity_scorer=_FixedScorer()))
    low, middle, high = [await guard.check(GuardContext(stage="output", text=f"Score {n}.")) for n in (40, 65, 80)]
    assert low.action == "allow"
    assert middle.action == "flag" and middle.allowed and "block_above" in middle.details["tier"]
    assert high.action == "block" and not high.allowed and "tier" not in high.details
    inp = await guard.check(GuardContext(stage="input", text="Score 95."))
    assert inp.action == "flag"  # input_action, whatever the score
    plain = ToxicityGuard(GuardSettings(), GuardResources(executor=executor, toxicity_scorer=_FixedScorer()))
    assert (await plain.check(GuardContext(stage="output", text="Score 65."))).action == "block"
    with pytest.raises(Exception, match="block_above must be a number between 0 and 1"):
        parse_policy("[guards.toxicity]\nblock_above = 2\n")


class _ThreatWordScorer(ToxicityScorer):
    """A fake scorer: 0.9 for a text containing "end you", else 0.1."""

    name = "threat-word"
    categories = ("toxicity",)

    def score_batch(self, texts):
        return [{"toxicity": 0.9 if "end you" in t else 0.1} for t in texts]

    def describe(self):
        return {"scorer": "threat-word"}


async def test_a_line_of_dialogue_cut_into_sentences_scores_as_its_frame(executor):
    """A quotation of several sentences is cut by the sentence splitter; its pieces score no higher
    than the text around it, while the narrator's own threat and an all-quotation answer keep theirs."""
    guard = ToxicityGuard(GuardSettings(), GuardResources(executor=executor, toxicity_scorer=_ThreatWordScorer()))
    story = 'The knight drew his sword and spoke. "Leave now. Or I will end you here." Then he rode away.'
    verdict = await guard.check(GuardContext(stage="output", text=story))
    assert verdict.action == "allow" and verdict.score == pytest.approx(0.1)
    own = 'The knight drew his sword. "Leave now," he said. I will end you, reader.'
    assert (await guard.check(GuardContext(stage="output", text=own))).action == "block"
    bare = '"Leave now. Or I will end you here."'  # nothing frames it: the answer says it
    assert (await guard.check(GuardContext(stage="output", text=bare))).action == "block"


async def test_requested_fiction_flags_unless_profanity_check_agrees(executor):
    """An answer to a request for fiction or role-play is flagged, not blocked, on a hit the
    second signal (profanity-check) does not share; a profane hit still blocks, and without the
    request the same answer blocks."""
    guard = ToxicityGuard(GuardSettings(), GuardResources(executor=executor, toxicity_scorer=_ThreatWordScorer()))
    villain = "Run, little hero. Next time I will end you."
    asked = "Write a line for a villain who threatens the hero but lets him go."
    fiction = await guard.check(GuardContext(stage="output", text=villain, prompt=asked))
    assert fiction.action == "flag" and fiction.allowed and "fiction" in fiction.details["tier"]
    plain = await guard.check(GuardContext(stage="output", text=villain, prompt="How do I reset my password?"))
    assert plain.action == "block"
    assert (await guard.check(GuardContext(stage="output", text=villain))).action == "block"
    profane = "Run, you fucking idiot, or I will end you."
    assert (await guard.check(GuardContext(stage="output", text=profane, prompt=asked))).action == "block"


@pytest.mark.parametrize(
    ("prompt", "fiction"),
    [
        ("Write a short scene where a detective confronts a murderer.", True),
        ("Give me a villain monologue for my fantasy novel.", True),
        ("Pretend you are a pirate and tell me a joke.", True),
        ("Can you role-play as my strict drill sergeant?", True),
        ("Compose a poem in which the sea threatens the sailors.", True),
        ("How do I kill a zombie process?", False),
        ("Write a SQL query to drop duplicate rows.", False),
        ("Summarise the news about the attack.", False),
        (None, False),
    ],
)
def test_requests_fiction(prompt, fiction):
    from guardrails.toxicity import requests_fiction

    assert requests_fiction(prompt) is fiction


def test_whole_quotation_is_the_words_inside_quotes_that_frame_nothing():
    from guardrails.toxicity import whole_quotation

    assert whole_quotation('"You are a worthless waste of space."') == "You are a worthless waste of space."
    assert whole_quotation("\u201cYou idiot\u201d.") == "You idiot"
    assert whole_quotation('The witness said "I will find you" twice.') is None
    assert whole_quotation("You're a moron and I'm right.") is None  # apostrophes are not quotes
    assert whole_quotation('""') is None


def test_direct_tfidf_is_refused_for_a_vectorizer_it_does_not_follow() -> None:
    """A vectorizer with bigrams, or one with sublinear tf, would be scored wrongly by hand: the
    scorer must keep scikit-learn's path for it (`_DirectTfidf.build` returns None)."""
    from profanity_check import profanity_check as package
    from sklearn.base import clone

    from guardrails.toxicity import ProfanityCheckScorer, _DirectTfidf

    linear = ProfanityCheckScorer._linear_parts(package.model)
    assert linear is not None
    assert _DirectTfidf.build(package.vectorizer, linear) is not None
    for change in ({"ngram_range": (1, 2)}, {"sublinear_tf": True}, {"analyzer": "char"}, {"binary": True}):
        other = clone(package.vectorizer).set_params(**change)
        other.vocabulary_, other.idf_ = package.vectorizer.vocabulary_, package.vectorizer.idf_
        assert _DirectTfidf.build(other, linear) is None, change
