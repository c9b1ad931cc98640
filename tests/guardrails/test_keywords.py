"""The keyword filter: every evasion the issue lists is caught, benign look-alikes pass, and
spans point at the original characters so redaction masks the right ones."""

from __future__ import annotations

import random
import string
import time
from pathlib import Path

import pytest

from guardrails.base import GuardContext, GuardResources, GuardSettings, mask_spans
from guardrails.errors import PolicyError
from guardrails.keywords import KeywordGuard, KeywordMatcher, load_term_file, parse_terms

TERMS = ["badword", "ass", "shit", "kill", "bad word phrase", "cunt", "hell", "re:\\bpin\\s*\\d{4}\\b"]
ALLOW = ["hell's kitchen"]


@pytest.fixture(scope="module")
def matcher() -> KeywordMatcher:
    return KeywordMatcher(parse_terms(TERMS), parse_terms(ALLOW))


EVASIONS = [
    ("plain", "this is a badword here", "badword"),
    ("case", "this is a BaDwOrD here", "BaDwOrD"),
    ("nfkc fullwidth", "this is a ｂａｄｗｏｒｄ here", "ｂａｄｗｏｒｄ"),
    ("nfkc math letters", "this is a 𝐛𝐚𝐝𝐰𝐨𝐫𝐝 here", "𝐛𝐚𝐝𝐰𝐨𝐫𝐝"),
    ("accents", "this is a bádwörd here", "bádwörd"),
    ("combining marks", "this is a ba\u0301dwo\u0308rd here", "ba\u0301dwo\u0308rd"),
    ("zero-width space", "this is a bad\u200bword here", "bad\u200bword"),
    ("zero-width joiner + soft hyphen", "bad\u200d\u00adword!", "bad\u200d\u00adword"),
    ("cyrillic homoglyphs", "this is a bаdwоrd here", "bаdwоrd"),  # а, о are Cyrillic
    ("greek homoglyphs", "this is a bαdwοrd here", "bαdwοrd"),  # α, ο are Greek
    ("leet digits", "this is a b4dw0rd here", "b4dw0rd"),
    ("leet symbols", "you $h!t", "$h!t"),
    ("leet 1 as i", "sh1t happens", "sh1t"),
    ("leet 1 as l", "I will k1ll it", "k1ll"),
    ("leet trailing symbols", "what an a$$", "a$$"),
    ("repeated letters", "this is a baaaadwooooord here", "baaaadwooooord"),
    ("repeated letters keep doubles", "shiiiiit", "shiiiiit"),
    ("spaced letters", "this is a b a d w o r d here", "b a d w o r d"),
    ("dotted letters", "this is a b.a.d-word here", "b.a.d-word"),
    ("mixed separators", "s-h-i-t", "s-h-i-t"),
    ("underscores", "k_i_l_l them", "k_i_l_l"),
    ("phrase", "a bad word phrase indeed", "bad word phrase"),
    ("phrase hyphenated", "a bad-word-phrase indeed", "bad-word-phrase"),
    ("phrase squashed", "a badwordphrase indeed", "badwordphrase"),
    ("end of sentence", "You said badword.", "badword"),
    ("combined evasions", "B Ä D\u200b W 0 R D!", "B Ä D\u200b W 0 R D"),
    ("regex term", "my PIN 1234 is secret", "PIN 1234"),
]


@pytest.mark.parametrize(("label", "text", "expected"), EVASIONS, ids=[e[0] for e in EVASIONS])
def test_evasions_are_caught_with_original_spans(matcher: KeywordMatcher, label: str, text: str, expected: str):
    found = matcher.find(text)
    assert [text[m.start : m.end] for m in found] == [expected], label


BENIGN = [
    ("scunthorpe", "I live in Scunthorpe."),
    ("class / assassin / passage", "The class read a passage about an assassin."),
    ("as is not ass", "Use it as is, as soon as you can."),
    ("skill / killer inside words", "Her skill made her a lady-killer at chess."),
    ("shitake-like", "We cooked shiitake mushrooms."),  # 'shiitake' is one word, not 'shit'
    ("hello / shell", "Hello from the shell script."),
    ("the pen is", "The pen is on the table."),
    ("let's hit", "Let's hit the road."),
    ("allowlisted phrase", "Dinner at Hell's Kitchen was great."),
    ("numbers only", "Call 5318008 or 1337 now."),
    ("exclamation", "Wow, bad! Word up!"),
    ("regex needs digits", "Pin the poster up."),
    ("russian text", "Привет, как дела?"),
]


@pytest.mark.parametrize(("label", "text"), BENIGN, ids=[b[0] for b in BENIGN])
def test_benign_look_alikes_pass(matcher: KeywordMatcher, label: str, text: str):
    assert matcher.find(text) == [], label


def test_allowlist_does_not_hide_other_matches(matcher: KeywordMatcher):
    text = "Hell's Kitchen is nice but go to hell"
    assert [text[m.start : m.end] for m in matcher.find(text)] == ["hell"]


def test_redaction_masks_exactly_the_original_characters(matcher: KeywordMatcher):
    text = "Ok: b\u200ba\u0301dwоrd, then 𝐬𝐡𝐢𝐭 and fine."
    spans = [(m.start, m.end) for m in matcher.find(text)]
    redacted = mask_spans(text, spans)
    assert redacted.startswith("Ok: ") and redacted.endswith(", then **** and fine.")
    assert "*" * len("b\u200ba\u0301dwоrd") in redacted


def test_term_file_syntax(tmp_path: Path):
    f = tmp_path / "terms.txt"
    f.write_text("# a comment\n\nbadword\n  spaced term  # trailing comment\nre:foo\\d+\n", encoding="utf-8")
    terms = load_term_file(f)
    assert [(t.text, t.regex, t.line) for t in terms] == [
        ("badword", False, 3),
        ("spaced term", False, 4),
        ("foo\\d+", True, 5),
    ]


def test_bad_regex_names_file_and_line(tmp_path: Path):
    f = tmp_path / "terms.txt"
    f.write_text("ok\n# c\nre:(unclosed\n", encoding="utf-8")
    with pytest.raises(PolicyError) as err:
        load_term_file(f)
    assert err.value.file == str(f) and err.value.line == 3
    assert "invalid regular expression" in str(err.value) and f"{f}:3" in str(err.value)


def test_missing_term_file_is_a_policy_error(tmp_path: Path):
    with pytest.raises(PolicyError, match="cannot read term file"):
        load_term_file(tmp_path / "nope.txt")


async def test_guard_actions(executor):
    resources = GuardResources(executor=executor)
    ctx = GuardContext(stage="input", text="a b4dw0rd here", role="user")
    for action in ("block", "redact", "flag"):
        guard = KeywordGuard(GuardSettings(action=action, options={"terms": ["badword"]}), resources)
        verdict = await guard.check(ctx)
        assert verdict.action == action and verdict.allowed == (action != "block")
        assert verdict.spans == ((2, 9),) and verdict.details["terms"] == ["badword"]
        assert verdict.ms > 0
    redact = KeywordGuard(GuardSettings(action="redact", options={"terms": ["badword"]}), resources)
    assert (await redact.check(ctx)).redacted_text == "a ******* here"
    clean = await redact.check(GuardContext(stage="input", text="all good"))
    assert clean.allowed and clean.action == "allow" and clean.redacted_text is None


def _random_terms(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(5, 10))) for _ in range(n)]


def test_thousands_of_terms_cost_well_under_a_millisecond():
    terms = [*_random_terms(5000), "badword"]
    m = KeywordMatcher(parse_terms(terms))
    text = (
        "Hello there, I would like to know how the quarterly revenue figures compare with last year "
        "and whether the budget should grow. Also, is b a d w 0 r d allowed?"
    )
    assert [text[x.start : x.end] for x in m.find(text)] == ["b a d w 0 r d"]
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        m.find(text)
        times.append(time.perf_counter() - t0)
    times.sort()
    assert times[100] < 1e-3, f"p50 {times[100] * 1e3:.3f} ms for 5000 terms"
