"""Checked streams that flow (issue 15): text goes out as the blocking guards pass it, never a
toxic sentence's toxic words nor a blocked term, however the answer is cut into deltas."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import pytest

from guardrails.engine import Guardrails, StreamChecker
from guardrails.keywords import KeywordGuard
from guardrails.policy import parse_policy
from guardrails.toxicity import ToxicityScorer

TOXIC_ANSWER = "Hello there, happy to help. You are a stupid idiot and I hate you. Goodbye now."
CLEAN_ANSWER = (
    "The tower stands in the middle of the city park. It was finished in the spring of that year. "
    "Visitors climb the stairs to the second floor. The view from the top reaches the distant hills. "
    "Tickets are sold at the gate every morning"
)


class PhraseScorer(ToxicityScorer):
    """Toxic only where a listed phrase appears whole (each of its words alone is harmless);
    remembers every text it scored."""

    name = "phrase"
    categories = ("toxicity",)

    def __init__(self, *phrases: str) -> None:
        self.phrases = phrases
        self.scored: list[str] = []

    def score_batch(self, texts: Sequence[str]) -> list[dict[str, float]]:
        self.scored.extend(texts)
        return [{"toxicity": float(any(p in t.lower() for p in self.phrases))} for t in texts]

    def describe(self) -> dict[str, Any]:
        return {"scorer": self.name}


def _cuts(text: str, how: str) -> list[str]:
    """The answer cut into deltas: one character each, one word each, or random sizes 1-9."""
    if how == "chars":
        return list(text)
    if how == "words":
        words = text.split(" ")
        return [w + " " for w in words[:-1]] + [words[-1]]
    rng = random.Random(how)
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 9)
        out.append(text[i : i + n])
        i += n
    return out


CUTS = ["chars", "words", "random-1", "random-2", "random-3", "random-4"]


async def _run(checker: StreamChecker, deltas: list[str]) -> list[str]:
    """Feed every delta; the text released after each call (cumulative), finish included."""
    released, sent = [], ""
    for delta in deltas:
        step = await checker.feed(delta)
        sent += step.release
        released.append(sent)
        if step.blocked:
            return released
    sent += (await checker.finish()).release
    released.append(sent)
    return released


async def _rails(executor: Any, policy: str, scorer: ToxicityScorer | None = None) -> Guardrails:
    return await Guardrails.load(parse_policy("version = 1\n" + policy), executor, toxicity_scorer=scorer)


TOXICITY_BLOCKS = '[guards.toxicity]\naction = "block"\n'


@pytest.mark.parametrize("how", CUTS)
async def test_a_toxic_sentence_is_never_released_however_it_arrives(executor, profanity_scorer, how: str):
    rails = await _rails(executor, TOXICITY_BLOCKS, profanity_scorer)
    checker = rails.stream()
    released = await _run(checker, _cuts(TOXIC_ANSWER, how))
    for sent in released:
        assert not any(word in sent for word in ("stupid", "idiot", "hate", "Goodbye")), sent
    assert checker.blocked and checker.blocked_by is not None and checker.blocked_by.guard == "toxicity"
    # The first sentence went out, and of the toxic one at most the words that passed with two
    # words after them ("You are a" scores clean; "You are a stupid" does not).
    assert released[-1] in ("Hello there, happy to help.", "Hello there, happy to help. You ")
    assert checker.released == released[-1]


@pytest.mark.parametrize("how", CUTS)
async def test_the_look_back_window_catches_a_phrase_split_across_releases(executor, how: str):
    """A three-word phrase that is toxic only whole: with the default look-ahead of two words
    none of it is released, wherever the deltas and release points fall."""
    scorer = PhraseScorer("purple monkey dishwasher")
    rails = await _rails(executor, TOXICITY_BLOCKS, scorer)
    answer = "We talked for a while about the weather and then the purple monkey dishwasher came up. Bye."
    checker = rails.stream()
    released = await _run(checker, _cuts(answer, how))
    assert checker.blocked
    assert "purple" not in released[-1] and released[-1].startswith("We talked for a while")
    assert "about the weather" in released[-1]  # the words before it did flow


async def test_without_the_window_the_split_phrase_would_have_leaked(executor):
    """The same stream with a look-ahead of one word: "purple" goes out before "dishwasher"
    arrives. This is what the window is for (and shows the test above can fail)."""
    rails = await _rails(executor, TOXICITY_BLOCKS, PhraseScorer("purple monkey dishwasher"))
    checker = rails.stream()
    checker.hold_words = 1
    released = await _run(checker, _cuts("Then the purple monkey dishwasher came up.", "words"))
    assert checker.blocked and "purple" in released[-1]


KEYWORDS_BLOCK = '[guards.keywords]\naction = "block"\nstages = ["output"]\nterms = ["bluebird", "secret sauce"]\n'


@pytest.mark.parametrize(
    "answer",
    [
        "Our recipe has a secret sauce in it. Done.",
        "We saw a b l u e b i r d over there. Done.",
        "We saw a Blue-Bird over there. Done.",
        "Look, a BLUEBIRD! Done.",
    ],
)
@pytest.mark.parametrize("how", ["chars", "words", "random-5"])
async def test_a_blocked_term_is_never_released(executor, answer: str, how: str):
    rails = await _rails(executor, KEYWORDS_BLOCK + "[guards.toxicity]\nenabled = false\n")
    guard = rails._output_guards(None, None)["keywords"]
    assert isinstance(guard, KeywordGuard)
    [match] = guard.matcher.find(answer)
    checker = rails.stream()
    released = await _run(checker, _cuts(answer, how))
    assert checker.blocked and checker.blocked_by is not None and checker.blocked_by.guard == "keywords"
    # Released text is a prefix of the answer that ends before the term begins.
    assert answer.startswith(released[-1]) and len(released[-1]) <= match.start
    assert released[-1].startswith(answer.split(" ")[0] + " ")  # the words before it flowed


async def test_keywords_alone_hold_only_what_could_still_become_a_term(executor):
    rails = await _rails(executor, KEYWORDS_BLOCK + "[guards.toxicity]\nenabled = false\n")
    checker = rails.stream()
    assert (await checker.feed("We met at noon")).release == "We met at noon"  # no term starts here
    assert (await checker.feed(" by the blue")).release == " by the "  # "blue" may become bluebird
    assert (await checker.feed("berry bush")).release == "blueberry bush"
    assert (await checker.feed(" and the secret")).release == " and the "  # "secret sauce"
    assert (await checker.feed(" garden.")).release == "secret garden."


async def test_redaction_is_applied_before_release(executor):
    policy = '[guards.keywords]\naction = "redact"\nstages = ["output"]\nterms = ["bluebird"]\n'
    rails = await _rails(executor, policy + "[guards.toxicity]\nenabled = false\n")
    answer = "The bluebird launch is on track. Nothing else to report."
    for how in ("chars", "words", "random-6"):
        checker = rails.stream()
        released = await _run(checker, _cuts(answer, how))
        assert all("blueb" not in sent for sent in released)
        assert released[-1] == "The ******** launch is on track. Nothing else to report."


async def test_redacting_toxicity_holds_whole_sentences(executor, profanity_scorer):
    """Toxicity set to redact masks the whole sentence, so none of an unfinished one goes out."""
    rails = await _rails(executor, '[guards.toxicity]\naction = "redact"\n', profanity_scorer)
    checker = rails.stream()
    released = await _run(checker, _cuts(TOXIC_ANSWER, "words"))
    assert released[3] == ""  # four words in, the first sentence is not complete yet
    assert released[4] == "Hello there, happy to help."
    masked = re.sub(r"\S", "*", "You are a stupid idiot and I hate you.")
    assert released[-1] == f"Hello there, happy to help. {masked} Goodbye now."


async def test_flag_only_guards_never_hold_text(executor, profanity_scorer):
    rails = await _rails(executor, '[guards.toxicity]\naction = "flag"\n', profanity_scorer)
    checker = rails.stream()
    for delta in _cuts(TOXIC_ANSWER, "chars"):
        assert (await checker.feed(delta)).release == delta  # out at once, even a half word
    assert (await checker.finish()).release == ""
    assert not checker.blocked
    summary = {v.guard: v for v in checker.summary()}
    assert summary["toxicity"].action == "flag"  # still checked, sentence by sentence


async def test_release_cadence(executor):
    """Structure, not timing: the first word goes out with the third, then two words per
    scoring; the unfinished sentence is scored once per two new words and every complete one
    whole, and never more than look-ahead + step words are held."""
    scorer = PhraseScorer("never said")
    rails = await _rails(executor, TOXICITY_BLOCKS, scorer)
    checker = rails.stream()
    deltas = _cuts(CLEAN_ANSWER, "words")
    releases = []
    for i, delta in enumerate(deltas):
        step = await checker.feed(delta)
        releases.append(step.release)
        held = checker.text[checker.checked :].split()
        assert len(held) <= checker.hold_words + checker.step_words, (i, held)
    releases.append((await checker.finish()).release)
    assert "".join(releases) == CLEAN_ANSWER
    assert releases[:3] == ["", "", "The "]
    words, sentences = len(deltas), CLEAN_ANSWER.count(". ") + 1
    content = [r for r in releases if r]
    assert len(content) >= words / 3  # at least one release per three words
    # scorings: about one per two words, plus one per complete sentence
    assert len(scorer.scored) <= words // 2 + 2 * sentences
    assert sum(1 for t in scorer.scored if t.endswith(".")) >= sentences - 1


async def test_sentence_holding_guards_keep_whole_sentences(executor, profanity_scorer):
    """A groundedness check set to block judges claims: it needs the whole sentence."""
    rails = await _rails(executor, TOXICITY_BLOCKS + '[guards.groundedness]\naction = "block"\n', profanity_scorer)
    checker = rails.stream()
    released = await _run(checker, _cuts(CLEAN_ANSWER, "words"))
    first = CLEAN_ANSWER.index(".") + 1
    assert all(sent in ("", CLEAN_ANSWER[:first]) for sent in released[:12])


class FragmentScorer(PhraseScorer):
    """Like the trained scorer on short fragments: anything under four words scores toxic."""

    def score_batch(self, texts: Sequence[str]) -> list[dict[str, float]]:
        self.scored.extend(texts)
        return [{"toxicity": float(len(t.split()) < 4)} for t in texts]


async def test_a_fragment_that_scores_toxic_alone_is_scored_again_at_the_next_word(executor):
    scorer = FragmentScorer()
    rails = await _rails(executor, TOXICITY_BLOCKS, scorer)
    checker = rails.stream()
    releases = [(await checker.feed(delta)).release for delta in _cuts(CLEAN_ANSWER, "words")]
    # three words score toxic (held), four pass: the first two words go out with the fourth,
    # long before the sentence ends
    assert releases[:4] == ["", "", "", "The tower "]
    assert scorer.scored[:2] == ["The tower stands", "The tower stands in"]
    assert not checker.blocked
