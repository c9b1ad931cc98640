"""Groundedness: sentence support, strong signals, the judge modes, and the HaluEval dev set."""

from __future__ import annotations

import json

import pytest

from guardrails.base import GuardContext, GuardResources, GuardSettings, Passage
from guardrails.groundedness import GroundednessGuard, parse_judgement, score_groundedness

from .conftest import HALUEVAL

PASSAGES = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by the engineering "
    "company of Gustave Eiffel and completed in 1889. The tower is 330 metres tall."
]


def test_supported_answer_scores_high():
    r = score_groundedness("The Eiffel Tower was completed in 1889. It is 330 metres tall.", PASSAGES)
    assert r.score == 1.0 and len(r.sentences) == 2


def test_unsupported_number_and_name_are_strong_signals():
    r = score_groundedness("The Eiffel Tower was completed in 1901 by Alexandre Dumas.", PASSAGES)
    (s,) = r.sentences
    assert s.score < 0.5
    assert set(s.strong) == {"1901", "Alexandre", "Dumas"}


def test_weakest_sentence_sets_the_score():
    r = score_groundedness("The tower is in Paris. It was painted purple by Napoleon in 1750.", PASSAGES)
    assert r.sentences[0].score == 1.0
    assert r.score == r.sentences[1].score < 0.5
    assert r.score < r.mean < 1.0


def test_question_words_are_not_claims():
    q = "Who designed the Eiffel Tower, the famous landmark?"
    assert score_groundedness("The famous landmark was designed by Gustave Eiffel.", PASSAGES, q).score == 1.0
    assert score_groundedness("The famous landmark was designed by Gustave Eiffel.", PASSAGES).score < 1.0


async def test_guard_flags_only_unsupported_sentences(executor):
    guard = GroundednessGuard(GuardSettings(action="redact"), GuardResources(executor=executor))
    text = "It was completed in 1889. It was moved to Lyon in 1920."
    passages = (Passage("p1", PASSAGES[0]),)
    v = await guard.check(GuardContext(stage="output", text=text, passages=passages))
    assert v.action == "redact" and v.spans == ((26, len(text)),)
    assert v.redacted_text is not None and v.redacted_text.startswith("It was completed in 1889. ")
    assert "Lyon" not in v.redacted_text
    empty = await guard.check(GuardContext(stage="output", text=text, passages=()))
    assert empty.allowed and empty.details["skipped"]


def test_parse_judgement():
    assert parse_judgement("SUPPORTED") is True
    assert parse_judgement("unsupported.") is False
    assert parse_judgement("Not supported") is False
    assert parse_judgement("I cannot tell") is None


async def test_llm_and_hybrid_modes_use_the_judge(executor):
    asked: list[str] = []

    async def judge(prompt: str) -> str:
        asked.append(prompt)
        return "SUPPORTED" if "Lyon" not in prompt.split("Answer to check:")[1] else "UNSUPPORTED"

    resources = GuardResources(executor=executor, judge=judge)
    passages = (Passage("p1", PASSAGES[0]),)
    llm = GroundednessGuard(GuardSettings(action="flag", options={"mode": "llm"}), resources)
    ok = await llm.check(
        GuardContext(stage="output", text="It opened in the year of the Paris fair.", passages=passages, prompt="When?")
    )
    assert ok.allowed and ok.score == 1.0 and ok.details["method"] == "llm" and len(asked) == 1
    assert "Question:\nWhen?" in asked[0] and PASSAGES[0] in asked[0]
    bad = await llm.check(GuardContext(stage="output", text="It was moved to Lyon.", passages=passages))
    assert bad.action == "flag" and bad.score == 0.0

    asked.clear()
    hybrid = GroundednessGuard(GuardSettings(action="block", options={"mode": "hybrid"}), resources)
    # lexically unsupported paraphrase, cleared by the judge
    v = await hybrid.check(
        GuardContext(stage="output", text="Gustave's firm built the Parisian landmark.", passages=passages)
    )
    assert v.allowed and len(asked) == 1
    asked.clear()
    v = await hybrid.check(GuardContext(stage="output", text="It was completed in 1889.", passages=passages))
    assert v.allowed and asked == []  # nothing flagged: no judge call
    v = await hybrid.check(GuardContext(stage="output", text="It was moved to Lyon in 1920.", passages=passages))
    assert not v.allowed and len(asked) == 1


TWO_SCHOOLS = [
    "Boston College is a private research university located in Chestnut Hill, Massachusetts. It was founded "
    "in 1863.Stanford University is a private research university in Stanford, California. Jane Stanford "
    "founded it with her husband in 1885. She survived him by 12 years."
]


def test_names_that_no_passage_sentence_puts_together_are_unlinked():
    q = "Which private research university is located in Chestnut Hill, Boston College or Stanford University?"
    wrong = score_groundedness("Stanford University is located in Chestnut Hill.", TWO_SCHOOLS, q)
    right = score_groundedness("Boston College is located in Chestnut Hill.", TWO_SCHOOLS, q)
    (w,) = wrong.sentences
    assert w.score == 1.0 and w.unlinked == ("Stanford University + Chestnut Hill",)  # every word is supported
    assert right.sentences[0].unlinked == ()
    # the glued paragraph boundary ("1863.Stanford") still separates the two schools' sentences
    assert score_groundedness("Boston College was founded in 1885.", TWO_SCHOOLS).sentences[0].unlinked


def test_synthesis_across_clauses_and_pronouns_is_not_unlinked():
    answers = [
        # the pronoun "She" stands for the paragraph's subject, Jane Stanford
        "Jane Stanford survived her husband by 12 years.",
        # names in different clauses are not compared with each other
        "Stanford University, which Jane Stanford founded in 1885, is in California.",
        "Boston College, founded in 1863, is in Chestnut Hill, while Stanford University is in Stanford.",
    ]
    for answer in answers:
        assert all(not s.unlinked for s in score_groundedness(answer, TWO_SCHOOLS).sentences), answer


def test_a_denial_needs_a_passage_that_denies():
    assert score_groundedness("Stanford University was not founded in 1885.", TWO_SCHOOLS).sentences[0].negation
    denied = ["Boston College is not in California; it was never moved from Chestnut Hill."]
    assert not score_groundedness("Boston College is not in California.", denied).sentences[0].negation
    assert not score_groundedness("Boston College was founded in 1863.", TWO_SCHOOLS).sentences[0].negation


async def test_guard_flags_unlinked_names_and_denials_under_strict_entities(executor):
    passages = (Passage("p1", TWO_SCHOOLS[0]),)
    strict = GroundednessGuard(GuardSettings(action="flag"), GuardResources(executor=executor))
    v = await strict.check(
        GuardContext("output", "Stanford University is located in Chestnut Hill.", passages=passages)
    )
    assert v.action == "flag" and "never together in the passages: Stanford University + Chestnut Hill" in v.reason
    assert v.details["sentences"][0]["unlinked"] == ["Stanford University + Chestnut Hill"]
    v = await strict.check(GuardContext("output", "Boston College was not founded in 1863.", passages=passages))
    assert v.action == "flag" and "a denial the passages do not make" in v.reason
    lax = GroundednessGuard(
        GuardSettings(action="flag", options={"strict_entities": False}), GuardResources(executor=executor)
    )
    v = await lax.check(GuardContext("output", "Stanford University is located in Chestnut Hill.", passages=passages))
    assert v.action == "allow"


@pytest.mark.skipif(not HALUEVAL.is_file(), reason=f"HaluEval dev set not found at {HALUEVAL}")
async def test_halueval_held_out_half_reaches_the_target():
    from evals.guards import eval_groundedness
    from guardrails.policy import default_policy

    g = await eval_groundedness(HALUEVAL, default_policy(), None, "random", 0, halves=False, split=True)
    sp = g["split"]
    assert sp["fit_items"] + sp["held_out_items"] == 250
    # measured: 0.912 at the policy's 0.8 on the half no rule or threshold was chosen on
    assert sp["policy"]["held_out_half"]["accuracy"] >= 0.88, sp
    assert sp["fitted"]["threshold"] in {float(k) for k in sp["fit_accuracy_by_threshold"]}
    assert g["ms_p50"] < 20.0


@pytest.mark.skipif(not HALUEVAL.is_file(), reason=f"HaluEval dev set not found at {HALUEVAL}")
async def test_halueval_dev_accuracy_above_target_on_each_half(executor):
    rows = [json.loads(line) for line in HALUEVAL.read_text(encoding="utf-8").splitlines() if line.strip()]
    guard = GroundednessGuard(GuardSettings(action="flag"), GuardResources(executor=executor))
    correct = [0, 0]
    for i, r in enumerate(rows):
        passages = (Passage(str(i), r["knowledge"]),)
        right = await guard.check(GuardContext("output", r["right_answer"], passages=passages, prompt=r["question"]))
        wrong = await guard.check(
            GuardContext("output", r["hallucinated_answer"], passages=passages, prompt=r["question"])
        )
        correct[i % 2] += (not right.hit) + wrong.hit
    halves = [correct[h] / (2 * len(rows[h::2])) for h in (0, 1)]
    assert min(halves) > 0.88, halves  # measured about 0.93 / 0.91 (0.864 / 0.844 before unlinked names)
