"""`gateway export dataset`: labelled and rated live traffic as a fine-tuning file or an eval set.

    gateway export dataset --since 7d [--rating-min 1] [--label good] [--exclude-blocked]
        --format openai-chat|eval --out FILE.jsonl [--json]

Formats, one JSON object per line:
- `openai-chat`: `{"messages": [...system/user..., {"role": "assistant", "content": ANSWER}]}`,
  the chat fine-tuning format, with `tools` when the request had them. The prompt is the one the
  model saw: the client's messages and, when RAG was used, the passages of the audit row put in
  the system message by `retrieval.build_rag_messages`, exactly as the pipeline did. ANSWER is
  the reviewer's corrected answer when there is one, else the logged answer.
- `eval`: the project's eval-set format (`evals.dataset.load_dataset`): `id` (the request id),
  `question` (the last user turn), `system` (the client's own system message), `collection`
  (the RAG collection searched), `documents` (the cited documents, `evals.metrics.cited_documents`),
  `reference` (the reviewer's corrected answer; else the logged answer when the record is judged
  good: label `ok`, or no label and a positive rating) and, for a blocked request, `expect`
  (`blocked:GUARD`, or `allowed` when a reviewer labelled the block a false positive).

Where the judgement comes from:
- Labels: `review_labels`, the newest row per request (a `cleared` row removes the label). `--label`
  takes a label name or a group: `good` = `ok`; `bad` = `hallucination`, `toxic`, `bad_retrieval`
  (`false_positive` and `other` only by their own names).
- A reviewer corrects an answer in a label's note starting with `Corrected answer:` (also
  `Correct answer:`, `Correction:`, `Reference:`); the text after the colon is the correction. The
  newest correction since the label was last cleared counts.
- Ratings: `feedback`, per key the newest row; a request's rating is the mean over the keys
  (`gateway.feedback.ratings`). `--rating-min R` keeps requests rated R or more.

Every exported text (messages, passages, answers, references) is redacted by the policy's
redacting guards (`--policy`, or the `policy` setting), as the gateway would redact it now, per
the request's key and model overrides. Left out, each counted by reason (stderr, and `--json`):
eval-run rows (`origin`), shadow copies, other endpoints, failed requests, blocked requests (with
`--exclude-blocked`; in `openai-chat` always, unless a reviewer corrected the answer), label and
rating filters, requests that cannot be read or hold non-text content, empty or truncated
answers, multi-turn conversations (`eval`: a question alone would lose their context), and
duplicates of a prompt already exported (the newest record of a prompt is kept).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
import tempfile
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from evals.metrics import cited_documents
from gateway.db import audit_records, review_labels
from gateway.feedback import ratings
from gateway.jsontext import loads_stored
from gateway.review_store import LABELS
from gateway.settings import Settings, open_engine
from gateway.usage import parse_since
from guardrails import (
    GUARDS,
    Guard,
    GuardContext,
    Guardrails,
    GuardResources,
    Passage,
    Policy,
    default_policy,
    load_policy,
    make_executor,
)
from guardrails.base import Stage, mask_spans
from retrieval import Hit, build_rag_messages

FORMATS = ("openai-chat", "eval")
CLEARED = "cleared"  # a label row that removes the request's label (history kept)
LABEL_GROUPS: Mapping[str, frozenset[str]] = {
    "good": frozenset({"ok"}),
    "bad": frozenset({"hallucination", "toxic", "bad_retrieval"}),
}
CHAT_ENDPOINT = "chat.completions"
PAGE = 500  # audit rows read per query
_CORRECTION = re.compile(
    r"^\s*(?:corrected answer|correct answer|corrected|correction|reference)\s*:\s*(?P<text>.+)$",
    re.IGNORECASE | re.DOTALL,
)
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_TEXT_PARTS = frozenset({"text", "input_text"})
_ROW_COLUMNS = (
    audit_records.c.id,
    audit_records.c.request_id,
    audit_records.c.created_at,
    audit_records.c.api_key_id,
    audit_records.c.endpoint,
    audit_records.c.model,
    audit_records.c.status,
    audit_records.c.blocked_by,
    audit_records.c.request_json,
    audit_records.c.response_text,
    audit_records.c.finish_reason,
    audit_records.c.passages_json,
    audit_records.c.citations_json,
    audit_records.c.index_versions,
)


class ExportError(ValueError):
    """A bad argument: said in one line, exit 2."""


@dataclass(frozen=True)
class ExportOptions:
    since: datetime
    format: str
    rating_min: float | None = None
    label: str | None = None  # a label name or a group of LABEL_GROUPS
    exclude_blocked: bool = False

    def wanted_labels(self) -> frozenset[str] | None:
        if self.label is None:
            return None
        return LABEL_GROUPS.get(self.label, frozenset({self.label}))


@dataclass
class ExportReport:
    """What an export wrote and what it left out, by reason."""

    format: str
    since: datetime
    exported: int = 0
    left_out: Counter[str] = field(default_factory=Counter)

    def public(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "since": self.since.isoformat(),
            "exported": self.exported,
            "left_out_total": sum(self.left_out.values()),
            "left_out": dict(sorted(self.left_out.items())),
        }


# ------------------------------------------------------------------ judgements


def corrected_answer(note: str | None) -> str | None:
    """The reviewer's corrected answer in a label note (`Corrected answer: ...`), or None."""
    if not note:
        return None
    match = _CORRECTION.match(note)
    text = match.group("text").strip() if match else ""
    return text or None


@dataclass(frozen=True)
class LabelState:
    label: str | None = None
    correction: str | None = None


def label_state(rows: Sequence[tuple[str, str | None]]) -> LabelState:
    """The current label and correction from a request's label rows (label, note), oldest first."""
    label: str | None = None
    correction: str | None = None
    for name, note in rows:
        if name == CLEARED:
            label, correction = None, None
            continue
        label = name
        correction = corrected_answer(note) or correction
    return LabelState(label, correction)


# ------------------------------------------------------------------ redaction


class Redactor:
    """The policy's redacting guards (action "redact"), applied to exported text per stage.

    Only those guards are built, so an export loads no model unless a redacting guard needs one.
    Each guard runs on the text the previous one masked, so every mask lands where it should.
    Messages and passages repeat across traffic (an app's system prompt, a popular chunk), so
    their results are kept in a bounded LRU; answers are checked each time (groundedness reads
    the passages and the prompt with them)."""

    CACHE_ENTRIES = 4096
    CACHE_MAX_CHARS = 4000  # longer texts are not cached: the cache holds at most ~16M characters

    def __init__(self, policy: Policy, resources: GuardResources) -> None:
        self.policy = policy
        self._resources = resources
        self._guards: dict[tuple[str | None, str | None], list[Guard]] = {}
        self._cache: OrderedDict[tuple[Any, ...], str] = OrderedDict()

    @classmethod
    async def load(cls, policy: Policy, executor: Executor) -> Redactor:
        if _redacting_names(policy) & {"toxicity"}:
            resources = (await Guardrails.load(policy, executor)).resources  # its scorer, loaded off the loop
        else:
            resources = GuardResources(executor=executor, toxicity_config=policy.toxicity)
        redactor = cls(policy, resources)
        redactor.guards(None, None)  # a guard that cannot be built fails now, not mid-export
        return redactor

    def _combination(self, api_key_id: str | None, model: str | None) -> tuple[str | None, str | None]:
        """The (key, model) overrides that apply: requests without overrides share one entry."""
        return (
            api_key_id if api_key_id in self.policy.key_overrides else None,
            model if model in self.policy.model_overrides else None,
        )

    def guards(self, api_key_id: str | None, model: str | None) -> list[Guard]:
        key = self._combination(api_key_id, model)
        found = self._guards.get(key)
        if found is None:
            settings = self.policy.for_request(*key).guards
            found = [GUARDS[n](s, self._resources) for n, s in settings.items() if s.enabled and s.action == "redact"]
            self._guards[key] = found
        return found

    async def redact(
        self,
        text: str,
        stage: Stage,
        api_key_id: str | None,
        model: str | None,
        *,
        role: str | None = None,
        passages: tuple[Passage, ...] = (),
        prompt: str | None = None,
    ) -> str:
        """`text` with what the policy redacts at `stage` ("input" for a message of `role`,
        "passage", "output") masked."""
        guards = self.guards(api_key_id, model)
        if not guards:
            return text
        cache_key = None
        if stage != "output" and len(text) <= self.CACHE_MAX_CHARS:
            cache_key = (self._combination(api_key_id, model), stage, role, text)
            cached = self._cache.get(cache_key)
            if cached is not None:
                self._cache.move_to_end(cache_key)
                return cached
        redacted = await self._redact(guards, text, stage, api_key_id, model, role, passages, prompt)
        if cache_key is not None:
            self._cache[cache_key] = redacted
            if len(self._cache) > self.CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return redacted

    @staticmethod
    async def _redact(
        guards: list[Guard],
        text: str,
        stage: Stage,
        api_key_id: str | None,
        model: str | None,
        role: str | None,
        passages: tuple[Passage, ...],
        prompt: str | None,
    ) -> str:
        for guard in guards:
            s = guard.settings
            if stage == "input" and not ("input" in s.stages and s.reads(role or "user")):
                continue
            if stage == "passage" and not (s.passages and "passage" in guard.stages):
                continue
            if stage == "output" and "output" not in s.stages:
                continue
            ctx = GuardContext(
                stage=stage,
                text=text,
                role=role,
                passages=passages,
                prompt=prompt,
                api_key_id=api_key_id,
                model=model,
            )
            verdict = await guard.check(ctx)
            if verdict.action == "redact" and verdict.spans:
                text = mask_spans(text, verdict.spans, guard.options.mask)
        return text


def _redacting_names(policy: Policy) -> set[str]:
    combos = [policy.for_request()]
    combos += [policy.for_request(api_key_id=k) for k in policy.key_overrides]
    combos += [policy.for_request(model=m) for m in policy.model_overrides]
    combos += [policy.for_request(k, m) for k in policy.key_overrides for m in policy.model_overrides]
    return {n for r in combos for n, s in r.guards.items() if s.enabled and s.action == "redact"}


# ------------------------------------------------------------------ records


class LeftOut(Exception):
    """A record that is not exported, and why (a short reason name)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Record:
    """One live audit row with its judgements."""

    row: Mapping[str, Any]
    labels: LabelState
    rating: float | None

    @property
    def key_id(self) -> str | None:
        value = self.row["api_key_id"]
        return str(value) if value is not None else None

    @property
    def model(self) -> str | None:
        value = self.row["model"]
        return str(value) if value is not None else None

    @property
    def judged_good(self) -> bool:
        if self.labels.label is not None:
            return self.labels.label in LABEL_GROUPS["good"]
        return self.rating is not None and self.rating > 0


def _text_of(content: Any) -> str | None:
    """A message's content as text; raises LeftOut for images, audio and other non-text parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") not in _TEXT_PARTS
                or not isinstance(part.get("text"), str)
            ):
                raise LeftOut("non_text_content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise LeftOut("unreadable_request")


def plain_messages(messages: Any) -> list[dict[str, Any]]:
    """The client's messages as plain {role, content[, name, tool_calls, tool_call_id]} dicts with
    text content; `developer` becomes `system`, as fine-tuning files know no developer role."""
    if not isinstance(messages, list) or not messages:
        raise LeftOut("unreadable_request")
    out: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict):
            raise LeftOut("unreadable_request")
        role = message.get("role")
        if role not in _ROLES:
            raise LeftOut("unsupported_message")
        text = _text_of(message.get("content"))
        plain: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
        tool_calls = message.get("tool_calls")
        if role == "assistant" and isinstance(tool_calls, list) and tool_calls:
            plain["tool_calls"] = tool_calls
        elif text is None:
            raise LeftOut("unreadable_request")
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise LeftOut("unreadable_request")
            plain["tool_call_id"] = message["tool_call_id"]
        if isinstance(message.get("name"), str):
            plain["name"] = message["name"]
        out.append(plain)
    return out


def _hits(passages: Any) -> list[Hit]:
    """The passages of an audit row (`gateway.rag.passage_record`) as retrieval hits."""
    if not isinstance(passages, list):
        return []
    hits = []
    for rank, p in enumerate(passages, start=1):
        if not isinstance(p, dict) or not isinstance(p.get("text"), str):
            raise LeftOut("unreadable_passages")
        hits.append(
            Hit(
                collection=str(p.get("collection") or ""),
                document_id=str(p.get("document") or ""),
                chunk_id=str(p.get("chunk_id") or ""),
                title=str(p.get("title") or ""),
                source=str(p.get("source") or ""),
                text=p["text"],
                score=float(p.get("score") or 0.0),
                rank=int(p.get("rank") or rank),
            )
        )
    return hits


class Builder:
    """Turns one record into an exported line (or raises LeftOut)."""

    def __init__(self, options: ExportOptions, redactor: Redactor) -> None:
        self.options = options
        self.redactor = redactor
        self._seen: set[bytes] = set()  # digests of the prompts exported so far (32 bytes each)

    def screen(self, record: Record) -> None:
        """The filters that need no text: endpoint, status, blocks, labels, ratings."""
        row, options = record.row, self.options
        if row["endpoint"] != CHAT_ENDPOINT:
            raise LeftOut("not_chat")
        if row["status"] not in ("ok", "blocked"):
            raise LeftOut("failed_request")
        if row["blocked_by"] is not None and (
            options.exclude_blocked or (options.format == "openai-chat" and record.labels.correction is None)
        ):
            raise LeftOut("blocked")
        wanted = options.wanted_labels()
        if wanted is not None:
            if record.labels.label is None:
                raise LeftOut("unlabelled")
            if record.labels.label not in wanted:
                raise LeftOut("label_mismatch")
        if options.rating_min is not None:
            if record.rating is None:
                raise LeftOut("unrated")
            if record.rating < options.rating_min:
                raise LeftOut("rating_below_min")

    async def build(self, record: Record) -> dict[str, Any]:
        self.screen(record)
        body = loads_stored(record.row["request_json"])
        if not isinstance(body, dict):
            raise LeftOut("unreadable_request")
        messages = await self._redacted_messages(record, plain_messages(body.get("messages")))
        hits = await self._redacted_hits(record, _hits(loads_stored(record.row["passages_json"])))
        if self.options.format == "openai-chat":
            line = await self._chat_line(record, body, messages, hits)
            key = json.dumps(line["messages"][:-1], sort_keys=True, ensure_ascii=False)
        else:
            line = await self._eval_line(record, body, messages, hits)
            key = json.dumps([line.get("system"), line["question"], line.get("collection")], ensure_ascii=False)
        digest = hashlib.sha256(key.encode("utf-8", "replace")).digest()
        if digest in self._seen:
            raise LeftOut("duplicate_prompt")
        self._seen.add(digest)
        return line

    async def _redacted_messages(self, record: Record, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for message in messages:
            if isinstance(message.get("content"), str):
                message["content"] = await self.redactor.redact(
                    message["content"], "input", record.key_id, record.model, role=message["role"]
                )
            for call in message.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    function["arguments"] = await self.redactor.redact(
                        function["arguments"], "input", record.key_id, record.model, role=message["role"]
                    )
        return messages

    async def _redacted_hits(self, record: Record, hits: list[Hit]) -> list[Hit]:
        out = []
        for hit in hits:
            text = await self.redactor.redact(hit.text, "passage", record.key_id, record.model)
            out.append(hit if text == hit.text else dataclasses.replace(hit, text=text))
        return out

    async def _answer(self, record: Record, messages: list[dict[str, Any]], hits: list[Hit]) -> str:
        """The correction, or the logged answer; redacted as the output guards would. Raises
        LeftOut for an empty or truncated answer."""
        correction = record.labels.correction
        answer = correction if correction is not None else record.row["response_text"]
        if not isinstance(answer, str) or not answer.strip():
            raise LeftOut("empty_answer")
        if correction is None and record.row["finish_reason"] == "length":
            raise LeftOut("truncated")
        users = [m["content"] for m in messages if m["role"] == "user" and isinstance(m["content"], str)]
        passages = tuple(Passage(id=h.chunk_id, text=h.text, title=h.title, source=h.source) for h in hits)
        return await self.redactor.redact(
            answer, "output", record.key_id, record.model, passages=passages, prompt=users[-1] if users else None
        )

    async def _chat_line(
        self, record: Record, body: dict[str, Any], messages: list[dict[str, Any]], hits: list[Hit]
    ) -> dict[str, Any]:
        prompt = build_rag_messages(messages, hits)  # the system block the model saw, when RAG was used
        answer = await self._answer(record, messages, hits)
        line: dict[str, Any] = {"messages": [*prompt, {"role": "assistant", "content": answer}]}
        if isinstance(body.get("tools"), list) and body["tools"]:
            line["tools"] = body["tools"]
        return line

    async def _eval_line(
        self, record: Record, body: dict[str, Any], messages: list[dict[str, Any]], hits: list[Hit]
    ) -> dict[str, Any]:
        row = record.row
        if any(m["role"] in ("assistant", "tool") for m in messages) or sum(m["role"] == "user" for m in messages) > 1:
            raise LeftOut("multi_turn")
        users = [m for m in messages if m["role"] == "user"]
        if not users or not (users[0]["content"] or "").strip():
            raise LeftOut("no_question")
        line: dict[str, Any] = {"id": row["request_id"], "question": users[0]["content"]}
        systems = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
        if systems:
            line["system"] = "\n\n".join(systems)
        collection = _collection(body, hits, row["index_versions"])
        if collection:
            line["collection"] = collection
        blocked = row["blocked_by"]
        if blocked is not None:
            line["expect"] = "allowed" if record.labels.label == "false_positive" else f"blocked:{blocked}"
        if record.labels.correction is not None or (blocked is None and record.judged_good):
            with contextlib.suppress(LeftOut):  # no usable answer: the item still checks retrieval and guards
                line["reference"] = await self._answer(record, messages, hits)
        citations = loads_stored(row["citations_json"])
        if isinstance(citations, list) and citations and blocked is None:
            documents = cited_documents(row["response_text"] or "", [c for c in citations if isinstance(c, dict)])
            if documents:
                line["documents"] = documents
        return line


def _collection(body: dict[str, Any], hits: Sequence[Hit], index_versions: str | None) -> str | None:
    """The RAG collection the request searched: its passages', its `rag` field's, or the index it used."""
    if hits and hits[0].collection:
        return hits[0].collection
    rag = body.get("rag")
    if isinstance(rag, dict) and isinstance(rag.get("collection"), str):
        return str(rag["collection"])
    versions = loads_stored(index_versions)
    if isinstance(versions, dict) and versions:
        return str(next(iter(versions)))
    return None


# ------------------------------------------------------------------ reading the audit log


async def _left_out_rows(engine: AsyncEngine, since: datetime) -> Counter[str]:
    """Rows that are not live traffic, counted without reading them: eval runs and shadow copies."""
    c = audit_records.c
    counts: Counter[str] = Counter()
    async with engine.connect() as conn:
        by_origin = await conn.execute(
            select(c.origin, func.count()).where(c.created_at >= since, c.origin.is_not(None)).group_by(c.origin)
        )
        for origin, n in by_origin:
            counts["eval_run" if origin == "eval" else "not_live_traffic"] += int(n)
        shadows = await conn.execute(
            select(func.count()).where(c.created_at >= since, c.origin.is_(None), c.shadow_of.is_not(None))
        )
        counts["shadow_copy"] += int(shadows.scalar_one())
    return +counts


async def _live_records(engine: AsyncEngine, since: datetime) -> AsyncIterator[Record]:
    """Live rows (no origin, not a shadow copy) of the window, newest first, with labels and ratings."""
    c = audit_records.c
    cursor: tuple[datetime, int] | None = None
    while True:
        query = select(*_ROW_COLUMNS).where(c.created_at >= since, c.origin.is_(None), c.shadow_of.is_(None))
        if cursor is not None:
            query = query.where(or_(c.created_at < cursor[0], and_(c.created_at == cursor[0], c.id < cursor[1])))
        query = query.order_by(c.created_at.desc(), c.id.desc()).limit(PAGE)
        async with engine.connect() as conn:
            rows = [dict(r._mapping) for r in await conn.execute(query)]
        if not rows:
            return
        cursor = (rows[-1]["created_at"], rows[-1]["id"])
        ids = [str(r["request_id"]) for r in rows]
        labels = await _labels(engine, ids)
        rated = await ratings(engine, ids)
        for row in rows:
            rid = str(row["request_id"])
            yield Record(row, label_state(labels.get(rid, [])), rated.get(rid))


async def _labels(engine: AsyncEngine, request_ids: list[str]) -> dict[str, list[tuple[str, str | None]]]:
    query = (
        select(review_labels.c.request_id, review_labels.c.label, review_labels.c.note)
        .where(review_labels.c.request_id.in_(request_ids))
        .order_by(review_labels.c.id)
    )
    out: dict[str, list[tuple[str, str | None]]] = {}
    async with engine.connect() as conn:
        for request_id, label, note in await conn.execute(query):
            out.setdefault(request_id, []).append((label, note))
    return out


async def export_dataset(
    engine: AsyncEngine, options: ExportOptions, redactor: Redactor, write: Callable[[dict[str, Any]], None]
) -> ExportReport:
    """Write every exportable record of the window with `write`, newest first; the report counts
    the rest by reason."""
    report = ExportReport(options.format, options.since)
    report.left_out.update(await _left_out_rows(engine, options.since))
    builder = Builder(options, redactor)
    async for record in _live_records(engine, options.since):
        try:
            line = await builder.build(record)
        except LeftOut as out:
            report.left_out[out.reason] += 1
            continue
        write(line)
        report.exported += 1
    return report


# ------------------------------------------------------------------ the command


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of `gateway export dataset`."""
    parser.add_argument("--since", default="7d", help="window: 90m, 24h, 7d, 2w or a date (default 7d)")
    parser.add_argument(
        "--rating-min",
        type=float,
        default=None,
        metavar="R",
        help="only requests whose user rating (mean of each key's newest, -1 to 1) is at least R",
    )
    parser.add_argument(
        "--label",
        default=None,
        metavar="LABEL",
        help="only requests whose current reviewer label is LABEL: good (= ok), bad (= hallucination, "
        f"toxic, bad_retrieval) or one of {', '.join(LABELS)}",
    )
    parser.add_argument("--exclude-blocked", action="store_true", help="leave out requests a guard blocked")
    parser.add_argument("--format", required=True, choices=FORMATS, help="openai-chat (fine-tuning) or eval")
    parser.add_argument("--out", required=True, metavar="FILE.jsonl", help="where to write ('-': standard output)")
    parser.add_argument(
        "--policy", default=None, metavar="FILE", help="policy whose redactions apply (default: the setting)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on standard output")


def _options(args: argparse.Namespace) -> ExportOptions:
    try:
        since = parse_since(args.since)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if since > datetime.now(UTC):
        raise ExportError(f"--since {args.since!r} is in the future")
    if args.rating_min is not None and not -1.0 <= args.rating_min <= 1.0:
        raise ExportError(f"--rating-min must be from -1 to 1; got {args.rating_min:g}")
    choices = {*LABEL_GROUPS, *LABELS} - {CLEARED}
    if args.label is not None and args.label not in choices:
        raise ExportError(f"--label {args.label!r}: choose good, bad or one of {', '.join(LABELS)}")
    if args.out == "-" and args.json:
        raise ExportError("--json prints to standard output, which --out - already uses; give --out a file")
    if args.out != "-":
        out = Path(args.out)
        if out.is_dir():
            raise ExportError(f"--out {args.out}: is a directory")
        if not out.resolve().parent.is_dir():
            raise ExportError(f"--out {args.out}: the folder {out.resolve().parent} does not exist")
    return ExportOptions(since, args.format, args.rating_min, args.label, args.exclude_blocked)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Entry point of `gateway export dataset`: 0 when written, 2 for bad arguments, 1 when the
    database cannot be read."""
    try:
        options = _options(args)
    except ExportError as exc:
        print(f"gateway export: {exc}", file=sys.stderr)
        return 2
    policy = load_policy(settings.policy) if settings.policy else default_policy()  # PolicyError: exit 2 (cli)
    try:
        if settings.migrate_on_start:
            from gateway.migrate import upgrade

            upgrade(settings.database_url)
        if args.out == "-":
            report = asyncio.run(_export(settings, options, policy, sys.stdout))
        else:
            report = _export_to_file(settings, options, policy, Path(args.out))
    except (SQLAlchemyError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"gateway export: cannot read the audit database: {first}", file=sys.stderr)
        return 1
    summary = report.public() | {"out": args.out}
    reasons = ", ".join(f"{k} {v}" for k, v in summary["left_out"].items()) or "none"
    print(
        f"gateway export: wrote {report.exported} {options.format} records to {args.out}; "
        f"left out {summary['left_out_total']}: {reasons}",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(summary))
    return 0


def _export_to_file(settings: Settings, options: ExportOptions, policy: Policy, out: Path) -> ExportReport:
    """Written to a temporary file beside `out`, renamed over it when complete: never half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            report = asyncio.run(_export(settings, options, policy, handle))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return report


async def _export(settings: Settings, options: ExportOptions, policy: Policy, handle: TextIO) -> ExportReport:
    executor = make_executor(settings.guard_workers)
    try:
        redactor = await Redactor.load(policy, executor)

        def write(line: dict[str, Any]) -> None:
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")

        async with open_engine(settings) as engine:
            return await export_dataset(engine, options, redactor, write)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
