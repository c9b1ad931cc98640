"""Policy files: the example loads, overrides layer correctly, and every invalid policy fails
with a message that names the file, the line and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardrails.errors import PolicyError
from guardrails.policy import default_policy, load_policy, parse_policy

EXAMPLE = Path(__file__).resolve().parents[2] / "guardrails" / "example-policy.toml"


def test_example_policy_loads_with_overrides():
    policy = load_policy(EXAMPLE)
    base = policy.for_request()
    assert base.guards["keywords"].action == "redact"
    assert base.guards["keywords"].roles == frozenset({"user", "tool"})
    assert all(Path(f).is_file() for f in base.guards["keywords"].options["term_files"])
    assert base.guards["groundedness"].thresholds == {"sentence": 0.8}
    assert base.on_empty_retrieval == "answer_without_passages"
    # model override, then key override on top of it
    assert policy.for_request(model="smollm2-135m").guards["groundedness"].action == "block"
    both = policy.for_request("team-research", "smollm2-135m")
    assert both.guards["toxicity"].action == "flag"
    assert both.guards["groundedness"].action == "block"
    assert not both.guards["injection"].enabled
    assert policy.for_request("kiosk").on_empty_retrieval == "refuse"
    # unknown keys and models fall back to the base policy
    assert policy.for_request("someone-else", "other-model").guards["toxicity"].action == "block"


def test_default_policy_enables_every_guard():
    base = default_policy().for_request()
    assert {n for n, s in base.guards.items() if s.enabled} == {"keywords", "injection", "toxicity", "groundedness"}
    assert base.guards["groundedness"].action == "flag"
    assert base.guards["injection"].passages is True


def test_threshold_overrides_merge_per_key():
    policy = parse_policy(
        """
[guards.toxicity.thresholds]
toxicity = 0.7
insult = 0.6

[overrides.api_key.k1.guards.toxicity.thresholds]
insult = 0.9
"""
    )
    assert policy.for_request("k1").guards["toxicity"].thresholds == {"toxicity": 0.7, "insult": 0.9}
    assert policy.for_request().guards["toxicity"].thresholds == {"toxicity": 0.7, "insult": 0.6}


BAD = [
    ("toml syntax", 'version = 1\n[guards.keywords]\naction = "block\n', 3, "invalid TOML"),
    ("unknown guard", "version = 1\n\n[guards.profanity]\nenabled = true\n", 3, "unknown guard 'profanity'"),
    (
        "bad action",
        '[guards.keywords]\nenabled = true\naction = "delete"\n',
        3,
        "action must be one of block, redact, flag",
    ),
    ("unknown key", "[guards.injection]\n\nthreshhold = 0.5\n", 3, "unknown key 'threshhold' for guard 'injection'"),
    (
        "threshold range",
        "[guards.toxicity]\n[guards.toxicity.thresholds]\ninsult = 1.5\n",
        3,
        "threshold 'insult' must be a number between 0 and 1",
    ),
    ("unknown threshold", "[guards.toxicity.thresholds]\ntoxic = 0.5\n", 2, "unknown threshold 'toxic'"),
    (
        "inline table threshold",
        '[guards.injection]\nthresholds = { score = "high" }\n',
        2,
        "threshold 'score' must be a number",
    ),
    ("bad role", '[guards.injection]\nroles = ["user", "robot"]\n', 2, "unknown role(s) ['robot']"),
    ("bad stage", '[guards.groundedness]\nstages = ["input"]\n', 2, "stages for guard 'groundedness'"),
    ("enabled type", '[guards.keywords]\nenabled = "yes"\n', 2, "'enabled' must be true or false"),
    ("empty retrieval", '[defaults]\non_empty_retrieval = "guess"\n', 2, "on_empty_retrieval must be one of"),
    ("bad model type", '[scorers.toxicity]\nmodel_type = "huge"\n', 2, "model_type must be one of"),
    ("bad scorer", '[scorers.toxicity]\n\n\nscorer = "perspective"\n', 4, "scorer must be auto, detoxify"),
    (
        "override kind",
        '[overrides.user.alice.guards.toxicity]\naction = "flag"\n',
        1,
        "overrides are per 'api_key' or per 'model'",
    ),
    (
        "override bad action",
        '[overrides.api_key."k-1".guards.toxicity]\n# comment\naction = "shout"\n',
        3,
        "action must be one of",
    ),
    (
        "quoted dotted key",
        '[overrides.model."gpt.4".guards.keywords]\nterms = ["ok", "re:("]\n',
        2,
        "invalid regular expression",
    ),
    ("top-level typo", "version = 1\ngaurds = {}\n", 2, "unknown top-level key 'gaurds'"),
    ("version", "version = 2\n", 1, "unsupported policy version 2"),
    ("missing term file", '[guards.keywords]\nterm_files = ["nope.txt"]\n', 2, "term file 'nope.txt' not found"),
    # a guard's own keys, checked by its options schema, keep their messages and lines
    ("empty mask", '[guards.keywords]\n\nmask = ""\n', 3, "mask must be a non-empty string"),
    ("bad mode", '[guards.groundedness]\nmode = "vibes"\n', 2, "mode must be lexical, llm or hybrid, not 'vibes'"),
    ("strict type", '[guards.groundedness]\nstrict_entities = "yes"\n', 2, "'strict_entities' must be true or false"),
    ("term type", '[guards.keywords]\n# terms\nterms = ["ok", 3]\n', 3, "'terms' must be a list of strings"),
    ("term files type", '[guards.keywords]\nterm_files = "x.txt"\n', 2, "'term_files' must be a list of file paths"),
    ("bad allow regex", '[guards.keywords]\nallow = ["re:["]\n', 2, "in 'allow': invalid regular expression"),
    ("option of another guard", '[guards.injection]\nmode = "llm"\n', 2, "unknown key 'mode' for guard 'injection'"),
    (
        "override option",
        '[overrides.model.m.guards.groundedness]\n# why\nmode = "x"\n',
        3,
        "mode must be lexical, llm or hybrid",
    ),
]


@pytest.mark.parametrize(("label", "text", "line", "problem"), BAD, ids=[b[0] for b in BAD])
def test_invalid_policy_names_file_line_and_problem(tmp_path: Path, label: str, text: str, line: int, problem: str):
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert err.value.file == str(path), label
    assert err.value.line == line, f"{label}: {err.value}"
    assert problem in err.value.problem, f"{label}: {err.value}"
    assert str(err.value).startswith(f"{path}:{line}: ")


def test_error_inside_a_term_file_names_that_file_and_its_line(tmp_path: Path):
    (tmp_path / "terms.txt").write_text("fine\nre:[oops\n", encoding="utf-8")
    path = tmp_path / "policy.toml"
    path.write_text('[guards.keywords]\nterm_files = ["terms.txt"]\n', encoding="utf-8")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert err.value.file == str(tmp_path / "terms.txt") and err.value.line == 2


def test_unreadable_policy_file(tmp_path: Path):
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.toml")


def test_guards_read_their_typed_options(tmp_path: Path):
    """Each guard's options come out of its own schema: defaults filled, paths made absolute."""
    from guardrails.base import GUARDS
    from guardrails.groundedness import GroundednessOptions
    from guardrails.keywords import KeywordOptions

    (tmp_path / "terms.txt").write_text("zorblax\n", encoding="utf-8")
    path = tmp_path / "policy.toml"
    path.write_text(
        '[guards.keywords]\nterm_files = ["terms.txt"]\nmask = "[x]"\n[guards.groundedness]\nmode = "hybrid"\n',
        encoding="utf-8",
    )
    base = load_policy(path).for_request()
    kw = GUARDS["keywords"].options_type.parse(base.guards["keywords"].options)
    assert isinstance(kw, KeywordOptions)
    assert kw.term_files == (str(tmp_path / "terms.txt"),) and kw.mask == "[x]" and kw.terms == ()
    gr = GUARDS["groundedness"].options_type.parse(base.guards["groundedness"].options)
    assert gr == GroundednessOptions(mode="hybrid", strict_entities=True, mask="*")
