"""The two answer shapes the pipeline serves: chat (`messages` in, `message`/`delta` out) and text
completions (`prompt` in, `text` out).

Everything that differs between `/v1/chat/completions` and `/v1/completions` lives here, in one
small object per endpoint, so the pipeline, the guards and the stream relay never branch on a
flag: where is the answer's text in a choice (and how to set it), in a stream event's choice,
what the input guards read, what a closing `content_filter` choice looks like, and which
fields of a choice the gateway relies on (checked before use).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Shape:
    """The text completion shape; `ChatShape` overrides what differs for chat."""

    name: str = "text"
    chunk_object: str = "text_completion"  # the `object` of a stream event
    retrieval: bool = False  # whether RAG can put passages into this shape's prompt
    answer_part: str | None = None  # the object of a choice holding the text (None: the choice)
    delta_part: str | None = None  # the same in a stream event's choice
    text_key: str = "text"  # the text's key in that object

    # --- answers (non-streamed) -------------------------------------------------------------
    def text(self, choice: dict[str, Any]) -> str | None:
        """The answer text of a choice, or None when it has none."""
        text = choice.get("text")
        return text if isinstance(text, str) else None

    def set_text(self, choice: dict[str, Any], text: str) -> None:
        choice["text"] = text

    # --- stream events ----------------------------------------------------------------------
    def delta_text(self, choice: dict[str, Any]) -> str | None:
        """The new text a stream event's choice carries (checked to be a string or None)."""
        text: str | None = choice.get("text")
        return text

    def set_delta_text(self, choice: dict[str, Any], text: str) -> None:
        choice["text"] = text

    def delta_keeps(self, choice: dict[str, Any]) -> bool:
        """Whether a choice with no text left still says something (a finish, a role, a tool call)."""
        return bool(choice.get("finish_reason"))

    def closing_choice(self, index: int, finish_reason: str) -> dict[str, Any]:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}

    def content_choice(self, index: int, text: str) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": None}

    def part(self, choice: dict[str, Any], stream: bool) -> tuple[str, object]:
        """(where, value): the part of a choice holding its text, for the shape checks."""
        name = self.delta_part if stream else self.answer_part
        return (name, choice.get(name)) if name is not None else ("", choice)

    # --- requests (input guards) ------------------------------------------------------------
    def prompt_messages(self, body: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The request's text as messages for the input guards; None when it has none (token ids)."""
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [{"role": "user", "content": p} for p in prompt]
        return None

    def unreadable_prompt(self, body: dict[str, Any]) -> str | None:
        """The field holding a prompt with no text to check (token ids, embeddings), if any."""
        if body.get("prompt_embeds") is not None:
            return "prompt_embeds"
        return "prompt" if self.prompt_messages(body) is None else None

    def blocked_param(self, body: dict[str, Any], field: str | None) -> str:
        """The request field a blocking input verdict is about (for the error's `param`)."""
        field = field or "prompt"
        if not field.startswith("messages["):
            return field
        if isinstance(body.get("prompt"), str):
            return "prompt"
        return "prompt" + field[len("messages") :].split(".", 1)[0]

    def put_back(self, body: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        """Write redacted messages back into the body that goes to the backend."""
        if isinstance(body.get("prompt"), str):
            body["prompt"] = messages[0]["content"]
        else:
            body["prompt"] = [m["content"] for m in messages]


@dataclass(frozen=True, slots=True)
class ChatShape(Shape):
    name: str = "chat"
    chunk_object: str = "chat.completion.chunk"
    retrieval: bool = True
    answer_part: str | None = "message"
    delta_part: str | None = "delta"
    text_key: str = "content"

    def text(self, choice: dict[str, Any]) -> str | None:
        content = (choice.get("message") or {}).get("content")
        return content if isinstance(content, str) else None

    def set_text(self, choice: dict[str, Any], text: str) -> None:
        choice.setdefault("message", {})["content"] = text

    def delta_text(self, choice: dict[str, Any]) -> str | None:
        text: str | None = (choice.get("delta") or {}).get("content")
        return text

    def set_delta_text(self, choice: dict[str, Any], text: str) -> None:
        delta = choice.get("delta")
        if delta is None:  # vLLM may send "delta": null on the last event
            delta = choice["delta"] = {}
        if "content" in delta or text:
            delta["content"] = text

    def delta_keeps(self, choice: dict[str, Any]) -> bool:
        delta = choice.get("delta") or {}
        return bool(choice.get("finish_reason")) or any(k != "content" for k in delta)

    def closing_choice(self, index: int, finish_reason: str) -> dict[str, Any]:
        return {"index": index, "logprobs": None, "finish_reason": finish_reason, "delta": {}}

    def content_choice(self, index: int, text: str) -> dict[str, Any]:
        return {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}

    def prompt_messages(self, body: dict[str, Any]) -> list[dict[str, Any]] | None:
        messages: list[dict[str, Any]] = body["messages"]
        return messages

    def unreadable_prompt(self, body: dict[str, Any]) -> str | None:
        return None

    def blocked_param(self, body: dict[str, Any], field: str | None) -> str:
        return field or "messages"

    def put_back(self, body: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        body["messages"] = messages


CHAT = ChatShape()
TEXT = Shape()


def choice_problem(shape: Shape, choice: object, stream: bool) -> str | None:
    """What is wrong with a choice the gateway reads; None: fine."""
    if not isinstance(choice, dict):
        return f"a choice is a {type(choice).__name__}, not an object"
    index = choice.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool):
        return "a choice's index is not an integer"
    finish = choice.get("finish_reason")
    if finish is not None and not isinstance(finish, str):
        return "a choice's finish_reason is not a string"
    where, part = shape.part(choice, stream)
    if part is None:
        return None
    if not isinstance(part, dict):
        return f"a choice's {where} is not an object"
    text = part.get(shape.text_key)
    if text is not None and not isinstance(text, str):
        return f"a choice's {where + '.' if where else ''}{shape.text_key} is not a string"
    return None


def answer_problem(shape: Shape, answer: object, stream: bool = False) -> str | None:
    """What is wrong with the shape of a backend answer (or stream event) that the gateway reads;
    None: fine. Only the fields the gateway uses are checked; the rest is the backend's business."""
    if not isinstance(answer, dict):
        return f"a JSON {type(answer).__name__}, not an object"
    choices = answer.get("choices")
    if choices is not None:
        if not isinstance(choices, list):
            return "choices is not an array"
        for choice in choices:
            problem = choice_problem(shape, choice, stream)
            if problem is not None:
                return problem
    usage = answer.get("usage")
    if usage is not None and not isinstance(usage, dict):
        return "usage is not an object"
    return None


def event_problem(shape: Shape, event: object) -> str | None:
    return answer_problem(shape, event, stream=True)


def well_formed_event(shape: Shape, event: object) -> bool:
    """`event_problem(shape, event) is None`, in one call: it runs for every event of every stream.

    `type(x) is` on purpose: decoded JSON has no subclasses, and it keeps `True` from passing for an int."""
    if type(event) is not dict:
        return False
    choices = event.get("choices")
    if choices is not None:
        if type(choices) is not list:
            return False
        for choice in choices:
            if not _well_formed_choice(shape, choice):
                return False
    usage = event.get("usage")
    return usage is None or type(usage) is dict


def _well_formed_choice(shape: Shape, choice: object) -> bool:
    if type(choice) is not dict or type(choice.get("index", 0)) is not int:
        return False
    finish = choice.get("finish_reason")
    if finish is not None and type(finish) is not str:
        return False
    part = choice if shape.delta_part is None else choice.get(shape.delta_part)
    if part is None:
        return True
    if type(part) is not dict:
        return False
    text = part.get(shape.text_key)
    return text is None or type(text) is str
