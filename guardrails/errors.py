"""The guardrails package's error tree, so the gateway maps it to HTTP in one place.

GuardrailsError                base class: anything this package raises on purpose
├── PolicyError                the policy file (or a term file it names) is invalid:
│                              the message names the file, the line and the problem
├── ScorerUnavailable          a configured model (Detoxify checkpoint, ...) cannot be loaded
└── GuardBlocked               raised by callers that prefer exceptions to results: an
                               input or output guard blocked; carries the verdict
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guardrails.base import Verdict


class GuardrailsError(Exception):
    """Base class of every error the guardrails package raises on purpose."""


class PolicyError(GuardrailsError):
    """An invalid policy: `file`, `line` (1-based, or None) and `problem` are kept separately."""

    def __init__(self, file: str, line: int | None, problem: str) -> None:
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {problem}")
        self.file = file
        self.line = line
        self.problem = problem


class ScorerUnavailable(GuardrailsError):
    """A configured scorer (e.g. a Detoxify checkpoint) could not be loaded."""


class GuardBlocked(GuardrailsError):
    """A guard blocked the request (stage "input") or the answer (stage "output")."""

    def __init__(self, verdict: Verdict, stage: str) -> None:
        super().__init__(f"{stage} blocked by guard {verdict.guard!r}: {verdict.reason}")
        self.verdict = verdict
        self.stage = stage
