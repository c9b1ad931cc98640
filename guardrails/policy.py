"""The guard policy: a TOML file (stdlib `tomllib`) that says, per guard, whether it runs,
where (stages, message roles, retrieved passages), with which thresholds and what happens on a
hit (block, redact, flag); with overrides per API key id and per model.

An invalid policy raises `PolicyError` naming the file, the line and the problem: tomllib's
own line for syntax errors, and for semantic errors the line of the offending key, found by
`_KeyLocator` (a small scan of table headers and `key =` lines). The format is documented in
guardrails/README.md and shown, commented, in guardrails/example-policy.toml.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import msgspec

# Importing the guard modules fills the registry.
from guardrails import groundedness, injection, keywords, moderation, toxicity  # noqa: F401
from guardrails.base import GUARDS, HIT_ACTIONS, Guard, GuardSettings, Stage, error_path
from guardrails.errors import PolicyError
from guardrails.toxicity import DETOXIFY_MODEL_TYPES, SCORER_KINDS, ToxicityConfig

EmptyRetrieval = Literal["answer_without_passages", "refuse"]
EMPTY_RETRIEVAL: tuple[EmptyRetrieval, ...] = ("answer_without_passages", "refuse")
#: How output guards treat a stream: "checked" releases only text they passed (a blocked sentence
#: is never sent); "optimistic" sends text as it comes and ends the stream with content_filter
#: when a later check fails (redactions then apply to the audit row only, not to sent text).
StreamMode = Literal["checked", "optimistic"]
STREAM_MODES: tuple[StreamMode, ...] = ("checked", "optimistic")
#: Message roles an input guard may be limited to; "request" stands for the texts outside the
#: messages (tool and function definitions, response_format and guided-decoding schemas, a
#: chat_template, documents, a completion's suffix); "all" (the default) for every one of them.
ROLES = frozenset({"user", "system", "tool", "assistant", "developer", "function", "request", "all"})
_TOP_KEYS = frozenset({"version", "defaults", "scorers", "guards", "overrides"})
_DEFAULT_KEYS = frozenset({"on_empty_retrieval", "refusal_message", "stream_mode"})
DEFAULT_REFUSAL = "I could not find any sources to answer this question."


@dataclass(frozen=True)
class RequestPolicy:
    """The effective policy for one (API key, model): what the engine needs per request."""

    guards: Mapping[str, GuardSettings]
    on_empty_retrieval: EmptyRetrieval
    refusal_message: str
    stream_mode: StreamMode = "checked"


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build with `load_policy(path)`, `parse_policy(text)` or `default_policy()`."""

    source: str
    base_dir: Path
    raw_defaults: Mapping[str, Any]
    raw_guards: Mapping[str, Mapping[str, Any]]
    key_overrides: Mapping[str, Mapping[str, Any]]
    model_overrides: Mapping[str, Mapping[str, Any]]
    toxicity: ToxicityConfig = field(default_factory=ToxicityConfig)
    _cache: dict[tuple[str | None, str | None], RequestPolicy] = field(default_factory=dict, compare=False)

    def for_request(self, api_key_id: str | None = None, model: str | None = None) -> RequestPolicy:
        """Merge the base policy with the model's and then the API key's overrides (key wins)."""
        key = (
            api_key_id if api_key_id in self.key_overrides else None,
            model if model in self.model_overrides else None,
        )
        found = self._cache.get(key)
        if found is None:
            layers = [self.model_overrides[key[1]]] if key[1] else []
            if key[0]:
                layers.append(self.key_overrides[key[0]])
            found = _resolve(self, layers, _KeyLocator.empty(self.source))
            self._cache[key] = found
        return found

    def uses_toxicity(self) -> bool:
        """True when any key/model combination enables the toxicity guard (so load the scorer)."""
        requests = [self.for_request()]
        requests += [self.for_request(api_key_id=k) for k in self.key_overrides]
        requests += [self.for_request(model=m) for m in self.model_overrides]
        requests += [self.for_request(k, m) for k in self.key_overrides for m in self.model_overrides]
        return any(r.guards["toxicity"].enabled for r in requests if "toxicity" in r.guards)


class _KeyLocator:
    """Finds the line that defines a dotted key path in a TOML text (best effort, 1-based)."""

    _HEADER = re.compile(r"^\s*\[\[?\s*(.+?)\s*\]\]?\s*(?:#.*)?$")
    _PART = r"""(?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+)"""
    _KEY = re.compile(rf"^\s*({_PART}(?:\s*\.\s*{_PART})*)\s*=")

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.lines: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for lineno, line in enumerate(text.splitlines(), start=1):
            m = self._HEADER.match(line)
            if m:
                table = self._split(m.group(1))
                for i in range(1, len(table) + 1):
                    self.lines.setdefault(table[:i], lineno)
                continue
            k = self._KEY.match(line)
            if k:
                path = table + self._split(k.group(1))
                for i in range(len(table) + 1, len(path) + 1):
                    self.lines.setdefault(path[:i], lineno)

    @classmethod
    def empty(cls, source: str) -> _KeyLocator:
        return cls(source, "")

    @staticmethod
    def _split(dotted: str) -> tuple[str, ...]:
        parts = re.findall(r"""\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*(?:\.|$)""", dotted)
        return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)

    def line(self, path: tuple[str, ...]) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def error(self, path: tuple[str, ...], problem: str) -> PolicyError:
        return PolicyError(self.source, self.line(path), problem)


def _expect_table(value: Any, path: tuple[str, ...], loc: _KeyLocator) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise loc.error(path, f"'{'.'.join(path)}' must be a table, not {type(value).__name__}")
    return value


def _check_flag(guard: type[Guard], key: str, value: Any, p: tuple[str, ...], loc: _KeyLocator) -> None:
    if not isinstance(value, bool):
        raise loc.error(p, f"'{key}' must be true or false")


def _check_action(guard: type[Guard], key: str, value: Any, p: tuple[str, ...], loc: _KeyLocator) -> None:
    if value not in HIT_ACTIONS:
        raise loc.error(p, f"action must be one of {', '.join(HIT_ACTIONS)}, not {value!r}")


def _check_message(guard: type[Guard], key: str, value: Any, p: tuple[str, ...], loc: _KeyLocator) -> None:
    if not isinstance(value, str) or not value.strip():
        raise loc.error(p, "message must be a non-empty string")


def _check_roles(guard: type[Guard], key: str, value: Any, p: tuple[str, ...], loc: _KeyLocator) -> None:
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise loc.error(p, "roles must be a list of strings")
    bad = [r for r in value if r not in ROLES]
    if bad:
        raise loc.error(p, f"unknown role(s) {bad} (known: {', '.join(sorted(ROLES))})")


def _check_stages(guard: type[Guard], key: str, value: Any, p: tuple[str, ...], loc: _KeyLocator) -> None:
    ok = sorted(s for s in guard.stages if s != "passage")
    if not isinstance(value, list) or not all(isinstance(s, str) and s in ok for s in value):
        raise loc.error(p, f"stages for guard '{guard.name}' must be a list drawn from {ok}, not {value!r}")


def _check_thresholds(guard: type[Guard], key: str, value: Any, p: tuple[str, ...], loc: _KeyLocator) -> None:
    for tk, tv in _expect_table(value, p, loc).items():
        if tk not in guard.default_thresholds:
            known = ", ".join(guard.default_thresholds)
            raise loc.error((*p, tk), f"unknown threshold '{tk}' for guard '{guard.name}' (known: {known})")
        if isinstance(tv, bool) or not isinstance(tv, int | float) or not 0.0 <= tv <= 1.0:
            raise loc.error((*p, tk), f"threshold '{tk}' must be a number between 0 and 1, not {tv!r}")


_KeyCheck = Callable[[type[Guard], str, Any, tuple[str, ...], _KeyLocator], None]
#: The keys every guard takes, each with its check; a guard's own keys are its `options_type`.
_COMMON_CHECKS: dict[str, _KeyCheck] = {
    "enabled": _check_flag,
    "passages": _check_flag,
    "action": _check_action,
    "message": _check_message,
    "roles": _check_roles,
    "stages": _check_stages,
    "thresholds": _check_thresholds,
}
_COMMON_GUARD_KEYS = frozenset(_COMMON_CHECKS)


def _check_guard_table(
    name: str, raw: Mapping[str, Any], path: tuple[str, ...], loc: _KeyLocator, base_dir: Path
) -> None:
    """Validate one guard's table (base or override layer); raise PolicyError on the first problem.

    The common keys are checked here; the guard's own keys by its options schema, whose
    msgspec errors name the key (`$.KEY`), mapped back to that key's line."""
    guard = GUARDS[name]
    option_keys = guard.options_type.keys()
    options: dict[str, Any] = {}
    for key, value in raw.items():
        check = _COMMON_CHECKS.get(key)
        if check is not None:
            check(guard, key, value, (*path, key), loc)
        elif key in option_keys:
            options[key] = value
        else:
            known = ", ".join(sorted(_COMMON_GUARD_KEYS | option_keys))
            raise loc.error((*path, key), f"unknown key '{key}' for guard '{name}' (known: {known})")
    try:
        guard.options_type.validate(options, base_dir)
    except msgspec.ValidationError as exc:
        keys, problem = error_path(exc)
        raise loc.error((*path, *keys), problem) from None


def _settings(name: str, layers: list[Mapping[str, Any]], base_dir: Path) -> GuardSettings:
    cls = GUARDS[name]
    merged: dict[str, Any] = {}
    thresholds: dict[str, float] = {}
    for layer in layers:
        for k, v in layer.items():
            if k == "thresholds":
                thresholds.update({tk: float(tv) for tk, tv in v.items()})
            else:
                merged[k] = v
    options = cls.options_type.resolve_paths({k: v for k, v in merged.items() if k not in _COMMON_GUARD_KEYS}, base_dir)
    return GuardSettings(
        enabled=bool(merged.get("enabled", cls.default_enabled)),
        action=merged.get("action", cls.default_action),
        message=merged.get("message", cls.default_message),
        thresholds=thresholds,
        roles=_roles(merged.get("roles", getattr(cls, "default_roles", None))),
        stages=frozenset(cast(list[Stage], merged.get("stages", sorted(cls.default_stages)))),
        passages=bool(merged.get("passages", cls.default_passages)),
        options=options,
    )


def _roles(value: list[str] | None) -> frozenset[str] | None:
    """The roles an input guard reads: None (every text the backend reads) unless limited."""
    if value is None or "all" in value:
        return None
    return frozenset(value)


def _resolve(policy: Policy, layers: list[Mapping[str, Any]], loc: _KeyLocator) -> RequestPolicy:
    defaults = dict(policy.raw_defaults)
    for layer in layers:
        defaults.update(layer.get("defaults", {}))
    guards: dict[str, GuardSettings] = {}
    for name in GUARDS:
        guard_layers = [policy.raw_guards.get(name, {})]
        guard_layers += [layer.get("guards", {}).get(name, {}) for layer in layers]
        guards[name] = _settings(name, guard_layers, policy.base_dir)
    return RequestPolicy(
        guards=guards,
        on_empty_retrieval=defaults.get("on_empty_retrieval", "answer_without_passages"),
        refusal_message=defaults.get("refusal_message", DEFAULT_REFUSAL),
        stream_mode=defaults.get("stream_mode", "checked"),
    )


def _check_defaults(raw: Mapping[str, Any], path: tuple[str, ...], loc: _KeyLocator) -> None:
    for key, _value in raw.items():
        if key not in _DEFAULT_KEYS:
            raise loc.error(
                (*path, key), f"unknown key '{key}' in [{'.'.join(path)}] (known: {', '.join(sorted(_DEFAULT_KEYS))})"
            )
    if "on_empty_retrieval" in raw and raw["on_empty_retrieval"] not in EMPTY_RETRIEVAL:
        raise loc.error(
            (*path, "on_empty_retrieval"),
            f"on_empty_retrieval must be one of {', '.join(EMPTY_RETRIEVAL)}, not {raw['on_empty_retrieval']!r}",
        )
    if "refusal_message" in raw and (not isinstance(raw["refusal_message"], str) or not raw["refusal_message"]):
        raise loc.error((*path, "refusal_message"), "refusal_message must be a non-empty string")
    if "stream_mode" in raw and raw["stream_mode"] not in STREAM_MODES:
        raise loc.error(
            (*path, "stream_mode"), f"stream_mode must be one of {', '.join(STREAM_MODES)}, not {raw['stream_mode']!r}"
        )


def _check_layer(raw: Mapping[str, Any], path: tuple[str, ...], loc: _KeyLocator, base_dir: Path) -> None:
    """An override layer: optional [defaults] and [guards.NAME] tables."""
    for key, value in raw.items():
        p = (*path, key)
        if key == "defaults":
            _check_defaults(_expect_table(value, p, loc), p, loc)
        elif key == "guards":
            for name, table in _expect_table(value, p, loc).items():
                if name not in GUARDS:
                    raise loc.error((*p, name), f"unknown guard '{name}' (known: {', '.join(sorted(GUARDS))})")
                _check_guard_table(name, _expect_table(table, (*p, name), loc), (*p, name), loc, base_dir)
        else:
            raise loc.error(p, f"unknown key '{key}' in an override (use [..defaults] or [..guards.NAME])")


def _toxicity_config(raw: Mapping[str, Any], loc: _KeyLocator, base_dir: Path) -> ToxicityConfig:
    path = ("scorers", "toxicity")
    known = {"scorer", "model_type", "checkpoint", "huggingface_config_dir", "trained_model", "device", "batch_size",
             "max_wait_ms", "gate"}  # fmt: skip
    for key in raw:
        if key not in known:
            raise loc.error(
                (*path, key), f"unknown key '{key}' in [scorers.toxicity] (known: {', '.join(sorted(known))})"
            )
    scorer = raw.get("scorer", "auto")
    if scorer not in SCORER_KINDS:
        raise loc.error(
            (*path, "scorer"), f"scorer must be {', '.join(SCORER_KINDS[:-1])} or {SCORER_KINDS[-1]}, not {scorer!r}"
        )
    model_type = raw.get("model_type", "original")
    if model_type not in DETOXIFY_MODEL_TYPES:
        raise loc.error(
            (*path, "model_type"), f"model_type must be one of {', '.join(DETOXIFY_MODEL_TYPES)}, not {model_type!r}"
        )
    paths: dict[str, str | None] = {}
    for key in ("checkpoint", "huggingface_config_dir", "trained_model"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise loc.error((*path, key), f"'{key}' must be a path")
        paths[key] = str(base_dir / value) if value and not Path(value).is_absolute() else value
    if scorer == "detoxify" and paths["checkpoint"] is None and paths["huggingface_config_dir"] is not None:
        raise loc.error((*path, "huggingface_config_dir"), "huggingface_config_dir needs a checkpoint as well")
    batch = raw.get("batch_size", 32)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise loc.error((*path, "batch_size"), "batch_size must be a positive integer")
    wait = raw.get("max_wait_ms", 2.0)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or wait < 0:
        raise loc.error((*path, "max_wait_ms"), "max_wait_ms must be a non-negative number")
    gate = raw.get("gate", True)
    if not isinstance(gate, bool):
        raise loc.error((*path, "gate"), f"gate must be true or false, not {gate!r}")
    return ToxicityConfig(
        scorer=scorer,
        gate=gate,
        model_type=model_type,
        checkpoint=paths["checkpoint"],
        huggingface_config_dir=paths["huggingface_config_dir"],
        trained_model=paths["trained_model"],
        device=str(raw.get("device", "cpu")),
        batch_size=batch,
        max_wait_ms=float(wait),
    )


def _load_toml(text: str, source: str) -> dict[str, Any]:
    """tomllib's parse, its syntax errors as PolicyError at tomllib's line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        line = int(m.group(1)) if m else None
        problem = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        if m:
            problem += f" (column {m.group(2)})"
        raise PolicyError(source, line, f"invalid TOML: {problem}") from None


def _overrides(
    raw: Mapping[str, Any], loc: _KeyLocator, base_dir: Path
) -> tuple[dict[str, Mapping[str, Any]], dict[str, Mapping[str, Any]]]:
    """The [overrides.api_key.ID] and [overrides.model.NAME] layers, each validated."""
    key_over: dict[str, Mapping[str, Any]] = {}
    model_over: dict[str, Mapping[str, Any]] = {}
    for kind, table in raw.items():
        if kind not in ("api_key", "model"):
            raise loc.error(("overrides", kind), f"overrides are per 'api_key' or per 'model', not {kind!r}")
        for ident, layer in _expect_table(table, ("overrides", kind), loc).items():
            layer = _expect_table(layer, ("overrides", kind, ident), loc)
            _check_layer(layer, ("overrides", kind, ident), loc, base_dir)
            (key_over if kind == "api_key" else model_over)[ident] = layer
    return key_over, model_over


def parse_policy(text: str, source: str = "<policy>", base_dir: str | Path | None = None) -> Policy:
    """Parse and validate a policy from TOML text; relative paths resolve against `base_dir`."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    raw = _load_toml(text, source)
    loc = _KeyLocator(source, text)
    for key in raw:
        if key not in _TOP_KEYS:
            raise loc.error((key,), f"unknown top-level key '{key}' (known: {', '.join(sorted(_TOP_KEYS))})")
    if raw.get("version", 1) != 1:
        raise loc.error(("version",), f"unsupported policy version {raw['version']!r} (this gateway reads 1)")
    defaults = _expect_table(raw.get("defaults", {}), ("defaults",), loc)
    _check_defaults(defaults, ("defaults",), loc)
    guards_raw = _expect_table(raw.get("guards", {}), ("guards",), loc)
    for name, table in guards_raw.items():
        if name not in GUARDS:
            raise loc.error(("guards", name), f"unknown guard '{name}' (known: {', '.join(sorted(GUARDS))})")
        _check_guard_table(name, _expect_table(table, ("guards", name), loc), ("guards", name), loc, base)
    scorers = _expect_table(raw.get("scorers", {}), ("scorers",), loc)
    for key in scorers:
        if key != "toxicity":
            raise loc.error(("scorers", key), f"unknown scorer section '{key}' (known: toxicity)")
    tox = _toxicity_config(_expect_table(scorers.get("toxicity", {}), ("scorers", "toxicity"), loc), loc, base)
    key_over, model_over = _overrides(_expect_table(raw.get("overrides", {}), ("overrides",), loc), loc, base)
    policy = Policy(source, base, defaults, guards_raw, key_over, model_over, tox)
    policy.for_request()  # resolve once so a bad combination fails now, not on the first request
    return policy


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; any problem raises PolicyError(file, line, problem)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(str(p), None, f"cannot read policy file: {exc}") from None
    return parse_policy(text, str(p), p.resolve().parent)


def default_policy() -> Policy:
    """The policy used when none is configured: every guard on with its defaults, no terms."""
    return parse_policy("", "<default policy>")
