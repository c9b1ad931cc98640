"""Toxicity: one `ToxicityScorer` seam, two implementations, one guard.

- `DetoxifyScorer`: Detoxify (original, unbiased, multilingual, original-small, unbiased-small)
  from a local checkpoint plus a local Hugging Face config/tokenizer folder (nothing can be
  downloaded on these machines); seven categories, batched.
- `TrainedToxicityScorer` (guardrails/trained_toxicity.py): a logistic-regression head on
  all-MiniLM-L6-v2 embeddings, trained by the project and shipped in the package: the default
  when no Detoxify checkpoint is configured. One category, `toxicity`.
- `ProfanityCheckScorer`: alt-profanity-check, whose trained weights ship inside the package:
  the fallback when the trained scorer cannot load. One category, `toxicity`.

`build_scorer` picks, for `scorer = "auto"`: a configured Detoxify checkpoint, else the trained
scorer, else alt-profanity-check; each scorer's `describe()["note"]` says why it runs.

Scorers are synchronous and CPU-heavy; the guard reaches them through `BatchingScorer`, which
gathers texts from concurrent requests for a millisecond or two and scores them in one call in
the shared executor, so the event loop only awaits.
"""

from __future__ import annotations

import abc
import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from guardrails.base import (
    Guard,
    GuardContext,
    GuardOptions,
    GuardResources,
    GuardSettings,
    HitAction,
    Span,
    Verdict,
    register,
)
from guardrails.errors import ScorerUnavailable
from guardrails.sentences import split_sentences

CATEGORIES: tuple[str, ...] = (
    "toxicity",
    "severe_toxicity",
    "obscene",
    "threat",
    "insult",
    "identity_attack",
    "sexual_explicit",
)
DETOXIFY_MODEL_TYPES: tuple[str, ...] = (
    "original",
    "unbiased",
    "multilingual",
    "original-small",
    "unbiased-small",
)
ScorerKind = Literal["auto", "detoxify", "trained", "profanity-check"]
SCORER_KINDS: tuple[ScorerKind, ...] = ("auto", "detoxify", "trained", "profanity-check")


#: A quotation: double or curly quotes, or single quotes that are not apostrophes (no letter
#: outside them), of three characters or more.
QUOTATION = re.compile(r'"[^"]{3,}?"|\u201c[^\u201d]{3,}?\u201d|(?<!\w)\'.{3,}?\'(?!\w)')
QUOTE_PLACEHOLDER = "something"
#: A quotation is framed when at least this many words are left around it.
FRAME_WORDS = 4


def unquoted(text: str) -> str | None:
    """`text` with its quotations replaced by a neutral word, when it has any and at least
    FRAME_WORDS words are left around them; else None (nothing quoted, or the quotation is the
    message itself, as in an answer that only says '"You are worthless."')."""
    out = QUOTATION.sub(QUOTE_PLACEHOLDER, text)
    if out == text or len(out.split()) < FRAME_WORDS:
        return None
    return out


def whole_quotation(text: str) -> str | None:
    """The words inside the quotes when `text` is one quotation and nothing else (an answer that
    only says '"You are worthless."'): quotes that frame nothing do not make it a report."""
    match = QUOTATION.fullmatch(text.strip().rstrip(".!?,;: "))
    return match.group(0)[1:-1].strip() or None if match else None


def quoted_sentences(text: str, sentences: Sequence[tuple[int, int]]) -> list[int]:
    """The indexes of the sentences that lie inside a quotation which goes beyond them (a line of
    dialogue of several sentences: the splitter cuts it, and each piece alone reads as the
    speaker's own words). A quotation wholly inside one sentence is the scorer's business."""
    quotes = [m.span() for m in QUOTATION.finditer(text)]
    out = []
    for i, (s, e) in enumerate(sentences):
        core = text[s:e].strip().strip("\"'\u201c\u201d")
        if not core:
            continue
        a = s + text[s:e].index(core)
        b = a + len(core)
        if any(qs <= a and b <= qe and not (s <= qs and qe <= e) for qs, qe in quotes):
            out.append(i)
    return out


#: A prompt that asks for fiction or role-play: a writing verb, then (within a few words) a
#: creative form or a character; or a role-play phrase. An answer to it may voice a villain's
#: threat or a character's insult by request (the frame is the prompt, not the answer).
FICTION_REQUEST = re.compile(
    r"\b(?:write|writing|compose|draft|create|invent|make\s+up|come\s+up\s+with|give\s+me|tell\s+me|"
    r"continue|generate|narrate|imagine|describe|need|want)\b[^.?!\n]{0,60}?\b(?:"
    r"stor(?:y|ies)|tale|fable|scene|dialogue|monologue|soliloquy|poem|haiku|limerick|sonnet|verse|"
    r"ballad|song|lyrics|screenplay|script|novel|novella|chapter|plot|fan\s*fic(?:tion)?|fiction|"
    r"villain|antagonist|henchm[ae]n|villainess|character|npc|taunt|battle\s+cry|backstory|"
    r"role-?play|campaign|quest|play|sketch)\b"
    r"|\b(?:pretend|imagine)\s+(?:you\s+are|you're|to\s+be|that\s+you)\b|\bact\s+as\b|\brole-?play"
    r"|\bin\s+character\b|\bplay(?:ing)?\s+the\s+(?:role|part)\b",
    re.IGNORECASE,
)


#: profanity-check's score from which it agrees that a sentence is toxic (its own 0.5 point).
PROFANITY_AGREES = 0.5


def requests_fiction(prompt: str | None) -> bool:
    """Whether the user's question asks for fiction or role-play (FICTION_REQUEST)."""
    return bool(prompt) and FICTION_REQUEST.search(prompt or "") is not None


@dataclass(frozen=True)
class ToxicityConfig:
    """Which scorer to load. `auto`: Detoxify when a checkpoint is set, else the trained scorer,
    else profanity-check. `trained_model`: a folder written by `gateway guards train-toxicity`
    (None: the head shipped in the package). `gate`: the trained scorer's cascade gate (texts it
    finds plainly non-toxic skip MiniLM; guardrails/trained_toxicity.py)."""

    scorer: ScorerKind = "auto"
    trained_model: str | None = None
    gate: bool = True
    model_type: str = "original"
    checkpoint: str | None = None
    huggingface_config_dir: str | None = None
    device: str = "cpu"
    batch_size: int = 32
    max_wait_ms: float = 2.0


class ToxicityScorer(abc.ABC):
    """Scores texts for toxicity. `score_batch` blocks: call it in an executor."""

    name: str
    categories: tuple[str, ...]

    @abc.abstractmethod
    def score_batch(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """One {category: probability} per text, in order."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """What is loaded, for start-up logs and /readyz."""


class ProfanityCheckScorer(ToxicityScorer):
    """alt-profanity-check: linear SVMs over word TF-IDF, calibrated; 3-28 us a text (`_DirectTfidf`)."""

    name = "alt-profanity-check"
    categories = ("toxicity",)

    def __init__(self, note: str | None = None) -> None:
        self.note = note or "trained weights bundled in the package"
        try:
            import profanity_check.profanity_check as package
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ScorerUnavailable(f"alt-profanity-check is not installed: {exc}") from exc
        self._predict_prob = package.predict_prob
        self._vectorizer = package.vectorizer
        # The model is a CalibratedClassifierCV over 5 linear SVMs with sigmoid calibration. Its
        # predict_proba spends ~5 ms per call in sklearn's input validation whatever the batch
        # size; the same arithmetic done directly takes ~0.1 ms. Fall back when the shape differs.
        self._linear = self._linear_parts(package.model)
        self._direct = _DirectTfidf.build(package.vectorizer, self._linear) if self._linear else None

    @staticmethod
    def _linear_parts(model: Any) -> list[tuple[Any, float, float, float]] | None:
        try:
            if list(model.classes_) != [0, 1]:
                return None
            parts = []
            for calibrated in model.calibrated_classifiers_:
                (calibrator,) = calibrated.calibrators
                coef = calibrated.estimator.coef_
                if coef.shape[0] != 1 or type(calibrator).__name__ != "_SigmoidCalibration":
                    return None
                parts.append(
                    (coef[0], float(calibrated.estimator.intercept_[0]), float(calibrator.a_), float(calibrator.b_))
                )
            return parts
        except (AttributeError, ValueError, TypeError):
            return None

    def score_batch(self, texts: Sequence[str]) -> list[dict[str, float]]:
        if not texts:
            return []
        if self._direct is not None:
            probs = self._direct.probabilities(texts)
        elif self._linear is None:
            probs = self._predict_prob(list(texts))
        else:
            import numpy as np

            features = self._vectorizer.transform(list(texts))
            probs = np.zeros(len(texts))
            for coef, intercept, a, b in self._linear:
                decision = features @ coef + intercept
                probs += 1.0 / (1.0 + np.exp(a * decision + b))  # sklearn's _SigmoidCalibration
            probs /= len(self._linear)
        return [{"toxicity": float(p)} for p in probs]

    def describe(self) -> dict[str, Any]:
        try:
            version = metadata.version("alt-profanity-check")
        except metadata.PackageNotFoundError:  # pragma: no cover
            version = "unknown"
        return {
            "scorer": self.name,
            "version": version,
            "categories": list(self.categories),
            "note": self.note,
        }


@dataclass(frozen=True)
class _DirectTfidf:
    """profanity-check's TF-IDF features and calibrated SVMs, computed without scikit-learn.

    `TfidfVectorizer.transform` costs ~0.25 ms per call before it reads a word (input checks,
    sparse matrix set-up): 275 us per text in the gateway's batches of one, 14 us per text in
    batches of 32. Its vectorizer here is plain enough to follow by hand: lowercase, the token
    pattern, English stop words out, word counts times idf, L2 norm. The result equals the
    package's `predict_prob` (tests/guardrails/test_toxicity.py); `build` returns None for a
    vectorizer configured otherwise, and scikit-learn's path is used."""

    token: re.Pattern[str]
    stop: frozenset[str]
    vocabulary: dict[str, int]
    weights: Any  # (vocabulary, models) float64: idf times each SVM's coefficients
    idf: Any  # (vocabulary,) float64
    intercepts: Any  # (models,)
    a: Any  # (models,) sigmoid calibration
    b: Any

    @classmethod
    def build(cls, vectorizer: Any, linear: list[tuple[Any, float, float, float]]) -> _DirectTfidf | None:
        import numpy as np

        try:
            params = vectorizer.get_params()
            plain = (
                params["analyzer"] == "word"
                and params["lowercase"]
                and params["ngram_range"] == (1, 1)
                and params["norm"] == "l2"
                and params["use_idf"]
                and not params["binary"]
                and not params["sublinear_tf"]
                and params["preprocessor"] is None
                and params["tokenizer"] is None
                and params["strip_accents"] is None
            )
            if not plain:
                return None
            idf = np.asarray(vectorizer.idf_, dtype=np.float64)
            coef = np.stack([np.asarray(c, dtype=np.float64) for c, _, _, _ in linear], axis=1)
            stop = vectorizer.get_stop_words()
            return cls(
                token=re.compile(params["token_pattern"]),
                stop=frozenset(stop or ()),
                vocabulary={str(k): int(v) for k, v in vectorizer.vocabulary_.items()},
                weights=idf[:, None] * coef,
                idf=idf,
                intercepts=np.array([i for _, i, _, _ in linear]),
                a=np.array([a for _, _, a, _ in linear]),
                b=np.array([b for _, _, _, b in linear]),
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            return None

    def probabilities(self, texts: Sequence[str]) -> Any:
        import numpy as np

        rows: list[int] = []
        columns: list[int] = []
        counts: list[int] = []
        vocabulary, stop = self.vocabulary, self.stop
        for i, text in enumerate(texts):
            seen: dict[int, int] = {}
            for word in self.token.findall(text.lower()):
                if word not in stop:
                    j = vocabulary.get(word)
                    if j is not None:
                        seen[j] = seen.get(j, 0) + 1
            rows.extend([i] * len(seen))
            columns.extend(seen)
            counts.extend(seen.values())
        n = len(texts)
        row = np.array(rows, dtype=np.intp)
        col = np.array(columns, dtype=np.intp)
        tf = np.array(counts, dtype=np.float64)
        norm = np.sqrt(np.bincount(row, weights=(tf * self.idf[col]) ** 2, minlength=n))
        scaled = tf / np.where(norm > 0, norm, 1.0)[row]
        contributions = self.weights[col] * scaled[:, None]
        decision = np.tile(self.intercepts, (n, 1))
        for k in range(decision.shape[1]):
            decision[:, k] += np.bincount(row, weights=contributions[:, k], minlength=n)
        return (1.0 / (1.0 + np.exp(self.a * decision + self.b))).mean(axis=1)


class DetoxifyScorer(ToxicityScorer):
    """Detoxify from a local checkpoint.

    Detoxify calls `config_class.from_pretrained(model_type)` with the checkpoint's
    `config.arch.args.model_type` (e.g. "bert-base-uncased") before anything else, which needs
    the hub. When that is not a local folder, it is pointed at `huggingface_config_dir`, and the
    model and tokenizer are built by Detoxify's own `get_model_and_tokenizer`; scoring is
    Detoxify's own `predict`. Without a checkpoint, Detoxify downloads one (networked hosts).
    """

    categories = CATEGORIES

    def __init__(
        self,
        model_type: str = "original",
        checkpoint: str | None = None,
        huggingface_config_dir: str | None = None,
        device: str = "cpu",
        note: str | None = None,
    ) -> None:
        self.note = note or "a Detoxify checkpoint is configured"
        if model_type not in DETOXIFY_MODEL_TYPES:
            raise ScorerUnavailable(
                f"unknown Detoxify model type {model_type!r}; use one of {', '.join(DETOXIFY_MODEL_TYPES)}"
            )
        self.model_type = model_type
        self.checkpoint = checkpoint
        self.huggingface_config_dir = huggingface_config_dir
        self.name = f"detoxify:{model_type}"
        try:
            self._model = self._load(device)
        except ScorerUnavailable:
            raise
        except Exception as exc:
            raise ScorerUnavailable(
                f"cannot load Detoxify ({model_type}) from checkpoint {checkpoint!r} with config dir "
                f"{huggingface_config_dir!r}: {type(exc).__name__}: {exc}"
            ) from exc
        self.categories = tuple(self._model.class_names)

    def _load(self, device: str) -> Any:
        import torch
        from detoxify import Detoxify
        from detoxify.detoxify import get_model_and_tokenizer

        if self.checkpoint is None:
            return Detoxify(model_type=self.model_type, device=device)
        ckpt = Path(self.checkpoint)
        if not ckpt.is_file():
            raise ScorerUnavailable(f"Detoxify checkpoint {str(ckpt)!r} does not exist")
        hf_dir = self.huggingface_config_dir
        if hf_dir is not None and not Path(hf_dir).is_dir():
            raise ScorerUnavailable(f"Hugging Face config folder {hf_dir!r} does not exist")
        # weights_only=False: Detoxify checkpoints carry their training config (plain dicts);
        # only load checkpoints you trust, as Detoxify itself does.
        loaded = torch.load(str(ckpt), map_location=device, weights_only=False)
        if "config" not in loaded or "state_dict" not in loaded:
            raise ScorerUnavailable(f"{ckpt}: not a Detoxify checkpoint (needs 'config' and 'state_dict')")
        args = dict(loaded["config"]["arch"]["args"])
        if hf_dir is not None and not Path(str(args.get("model_type", ""))).is_dir():
            args["model_type"] = hf_dir
        rename = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}
        class_names = [rename.get(c, c) for c in loaded["config"]["dataset"]["args"]["classes"]]
        model, tokenizer = get_model_and_tokenizer(
            **args, state_dict=loaded["state_dict"], huggingface_config_path=hf_dir
        )
        detox = Detoxify.__new__(Detoxify)  # Detoxify's own predict(), with the model built above
        detox.model, detox.tokenizer, detox.class_names = model, tokenizer, class_names
        detox.device = device
        detox.model.to(device)
        return detox

    def score_batch(self, texts: Sequence[str]) -> list[dict[str, float]]:
        if not texts:
            return []
        raw = self._model.predict(list(texts))
        out: list[dict[str, float]] = [{} for _ in texts]
        for category, values in raw.items():
            if not isinstance(values, list):
                values = [values]
            for i, v in enumerate(values):
                out[i][category] = float(v)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "scorer": "detoxify",
            "model_type": self.model_type,
            "checkpoint": self.checkpoint,
            "huggingface_config_dir": self.huggingface_config_dir,
            "categories": list(self.categories),
            "note": self.note,
        }


def wants_sentence_encoder(config: ToxicityConfig) -> bool:
    """Whether `build_scorer(config)` would run the trained scorer, which embeds with the bundled
    MiniLM (a caller may then hand it an `embed` of its own, e.g. on ONNX Runtime)."""
    return config.scorer == "trained" or (config.scorer == "auto" and not config.checkpoint)


def build_scorer(config: ToxicityConfig, embed: Any = None) -> ToxicityScorer:
    """Load the configured scorer (blocking: call at start-up, off the event loop).

    `auto` tries, in order: a configured Detoxify checkpoint (its errors are raised: a
    checkpoint that was asked for must load), the trained scorer, alt-profanity-check. `embed`
    (an `embed(texts) -> array` callable) lets a caller share its sentence encoder with the
    trained scorer; without it the scorer loads the bundled MiniLM itself."""
    from guardrails.trained_toxicity import TrainedToxicityScorer

    kind = config.scorer
    if kind == "detoxify" or (kind == "auto" and config.checkpoint):
        why = (
            "a Detoxify checkpoint is configured" if config.checkpoint else "scorer = detoxify (downloads its weights)"
        )
        return DetoxifyScorer(
            config.model_type, config.checkpoint, config.huggingface_config_dir, config.device, note=why
        )
    if kind == "trained" or (kind == "auto" and config.trained_model):  # a model that was asked for must load
        return TrainedToxicityScorer(
            config.trained_model,
            embed=embed,
            note="the policy names the trained scorer or its model folder",
            gate=config.gate,
        )
    if kind == "profanity-check":
        return ProfanityCheckScorer(note="scorer = profanity-check in the policy")
    if kind != "auto":
        raise ScorerUnavailable(f"unknown toxicity scorer {kind!r}")
    try:
        return TrainedToxicityScorer(
            config.trained_model,
            embed=embed,
            note="no Detoxify checkpoint is configured: the trained MiniLM head runs",
            gate=config.gate,
        )
    except ScorerUnavailable as exc:
        return ProfanityCheckScorer(
            note=f"no Detoxify checkpoint is configured and the trained scorer cannot load ({exc}): "
            "alt-profanity-check runs, which catches profanity but not threats or insults without swear words"
        )


#: Texts whose scores `BatchingScorer` keeps (least recently used out first), and the longest
#: text it keeps: guards score sentences and messages, and 8,192 of 1,000 characters is 8 MB at most.
SCORE_CACHE_SIZE = 8192
SCORE_CACHE_MAX_CHARS = 1000


class BatchingScorer:
    """Gathers texts from concurrent callers and scores them in one executor call."""

    def __init__(
        self, scorer: ToxicityScorer, resources: GuardResources, max_batch: int = 32, max_wait_ms: float = 2.0
    ) -> None:
        self.scorer = scorer
        self.resources = resources
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._pending: list[tuple[list[str], asyncio.Future[list[dict[str, float]]]]] = []
        self._count = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # how many executor calls were made (observable in tests/benchmarks)
        # Scores of texts seen lately. A chat client sends the whole conversation every turn, so
        # without it each turn scores every earlier user message again (and common answer
        # sentences, "I can't help with that.", are scored once). Bounded by entries and by
        # text length; a reload builds a new scorer, and a new cache with it.
        self._cache: OrderedDict[str, dict[str, float]] = OrderedDict()
        self.cache_size = SCORE_CACHE_SIZE
        self.cache_hits = 0
        self.cache_misses = 0

    async def score(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """Each text's scores: from the cache, or scored with the texts of concurrent callers."""
        if not texts:
            return []
        found = [self._cached(t) for t in texts]
        missing = [t for t, f in zip(texts, found, strict=True) if f is None]
        self.cache_hits += len(texts) - len(missing)
        self.cache_misses += len(missing)
        if not missing:
            return [dict(f) for f in found if f is not None]
        fresh = iter(await self._score(missing))
        out = []
        for text, scores in zip(texts, found, strict=True):
            if scores is None:
                scores = next(fresh)
                if len(text) <= SCORE_CACHE_MAX_CHARS and self.cache_size > 0:
                    self._cache[text] = scores
                    if len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
            out.append(dict(scores))
        return out

    def _cached(self, text: str) -> dict[str, float] | None:
        scores = self._cache.get(text)
        if scores is not None:
            self._cache.move_to_end(text)
        return scores

    async def _score(self, texts: Sequence[str]) -> list[dict[str, float]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[dict[str, float]]] = loop.create_future()
        self._pending.append((list(texts), fut))
        self._count += len(texts)
        # Adaptive: with nothing in flight, score now (no waiting at low load); while a batch
        # runs, callers gather and go together when it returns (or when the batch is full).
        if self._count >= self.max_batch or not self._tasks:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_wait, self._flush)
        return await fut

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending, self._count = self._pending, [], 0
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[list[str], asyncio.Future[list[dict[str, float]]]]]) -> None:
        texts = [t for chunk, _ in batch for t in chunk]
        self.batches += 1
        try:
            scores = await self.resources.run_blocking(self.scorer.score_batch, texts)
        except Exception as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        pos = 0
        for chunk, fut in batch:
            if not fut.done():
                fut.set_result(scores[pos : pos + len(chunk)])
            pos += len(chunk)
        if self._pending and len(self._tasks) <= 1:
            self._flush()  # whoever queued while this batch ran goes now


class ToxicityOptions(GuardOptions, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The toxicity guard's own policy key: what a hit on user input does (`action` is the
    answer's). Flag by default: an abusive message is recorded and reviewable, but a false
    positive never refuses a user."""

    input_action: HitAction = "flag"
    #: Two tiers where a hit blocks: a text whose worst score is below this is flagged instead
    #: (recorded and reviewable, not withheld). None: every hit blocks.
    block_above: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None

    problems: ClassVar[dict[str, str]] = {
        **GuardOptions.problems,
        "input_action": "input_action must be one of block, redact, flag, not {value!r}",
        "block_above": "block_above must be a number between 0 and 1, not {value!r}",
    }


@register
class ToxicityGuard(Guard):
    """Scores each sentence; a hit is any category at or above its threshold.

    By default it checks the answer (a hit blocks it) and the users' messages (a hit flags the
    request: `input_action`); other roles (system prompts, tool results) only when the policy
    lists them in `roles`.

    Two readings of context the sentence-level scores miss: the sentences of a quotation that
    the splitter cut (a line of dialogue) score no higher than the text around the quotation
    (`quoted_sentences`); and an answer to a request for fiction or role-play
    (`requests_fiction`) is flagged rather than blocked unless profanity-check agrees."""

    name: ClassVar[str] = "toxicity"
    stages = frozenset({"input", "output", "passage"})
    default_stages = frozenset({"input", "output"})
    default_roles: ClassVar[tuple[str, ...]] = ("user",)
    options_type = ToxicityOptions
    options: ToxicityOptions
    defers_flags = True  # a model pass (or a classifier call): input flags need not delay the backend
    default_message = "The answer was withheld because it may contain toxic content."
    default_thresholds: ClassVar[dict[str, float]] = {
        "toxicity": 0.5,
        "severe_toxicity": 0.5,
        "obscene": 0.5,
        "threat": 0.5,
        "insult": 0.5,
        "identity_attack": 0.5,
        "sexual_explicit": 0.5,
    }

    def __init__(self, settings: GuardSettings, resources: GuardResources) -> None:
        super().__init__(settings, resources)
        scorer = resources.toxicity_scorer
        if scorer is None:
            raise ScorerUnavailable("the toxicity guard is enabled but no toxicity scorer is loaded")
        batcher = resources.toxicity_batcher
        if batcher is None or batcher.scorer is not scorer:
            cfg = resources.toxicity_config or ToxicityConfig()
            batcher = BatchingScorer(scorer, resources, max_batch=cfg.batch_size, max_wait_ms=cfg.max_wait_ms)
            resources.toxicity_batcher = batcher
        self.batcher: BatchingScorer = batcher
        self._profanity: ProfanityCheckScorer | None = None  # built on the first requested-fiction hit

    async def _profane(self, texts: Sequence[str]) -> bool:
        """Whether alt-profanity-check scores any of `texts` at PROFANITY_AGREES or more (True
        when it is not installed: without the second signal nothing is relaxed)."""
        if self._profanity is None:
            try:
                self._profanity = ProfanityCheckScorer(note="second signal for requested fiction")
            except ScorerUnavailable:
                return True
        scores = await self.resources.run_blocking(self._profanity.score_batch, texts)
        return any(sc["toxicity"] >= PROFANITY_AGREES for sc in scores)

    def action_for(self, ctx: GuardContext) -> HitAction:
        """The policy's `action`, except on input, where `input_action` decides."""
        return self.options.input_action if ctx.stage == "input" else self.settings.action

    async def check(self, ctx: GuardContext) -> Verdict:
        started = time.perf_counter()
        sentences = split_sentences(ctx.text)
        if not sentences:
            return self.allow(ctx, 0.0, started)
        texts = [ctx.text[s:e] for s, e in sentences]
        # A line of dialogue cut into sentences: its pieces score no higher than the text around
        # the quotation (the frame), as a quotation inside one sentence does in the scorer.
        inside = quoted_sentences(ctx.text, sentences) if len(sentences) > 1 else []
        frame = unquoted(ctx.text) if inside else None
        scores = await self.batcher.score(texts + ([frame] if frame is not None else []))
        if frame is not None:
            framed = scores.pop()
            for i in inside:
                scores[i] = {cat: min(v, framed.get(cat, v)) for cat, v in scores[i].items()}
        worst: dict[str, float] = {}
        spans: list[Span] = []
        categories_hit: set[str] = set()
        for (s, e), sc in zip(sentences, scores, strict=True):
            flagged = False
            for cat, value in sc.items():
                worst[cat] = max(worst.get(cat, 0.0), value)
                threshold = self.thresholds.get(cat)
                if threshold is not None and value >= threshold:
                    flagged = True
                    categories_hit.add(cat)
            if flagged:
                spans.append((s, e))
        top = max(worst.values()) if worst else 0.0
        details = {"scorer": self.batcher.scorer.name, "scores": {k: round(v, 4) for k, v in worst.items()}}
        if not spans:
            return self.allow(ctx, top, started, **details)
        action = self.action_for(ctx)
        block_above = self.options.block_above
        if action == "block" and block_above is not None and top < block_above:
            action = "flag"  # the lower tier: between the threshold and block_above
            details["tier"] = f"flag: below block_above {block_above}"
        if action == "block" and ctx.stage == "output" and requests_fiction(ctx.prompt):
            # The user asked for fiction or role-play: a villain's threat is what was ordered.
            # Flag it (recorded, reviewable) unless profanity-check, a second and independent
            # signal, finds the offending sentences profane too.
            offending = [ctx.text[s:e] for s, e in spans]
            if not await self._profane(offending):
                action = "flag"
                details["tier"] = "flag: the prompt asks for fiction and profanity-check does not agree"
        return self.hit(
            ctx,
            top,
            started,
            f"toxic content ({', '.join(sorted(categories_hit))})",
            tuple(spans),
            action=action,
            categories=sorted(categories_hit),
            **details,
        )
