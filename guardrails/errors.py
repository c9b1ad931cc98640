"""The guardrails package's error tree, so the gateway maps it to HTTP in one place.

GuardrailsError                base class: anything this package raises on purpose
├── PolicyError                the policy file (or a term file it names) is invalid:
│                              the message names the file, the line and the problem
└── ScorerUnavailable          a configured model (Detoxify checkpoint, ...) cannot be loaded

A guard that blocks is not an error: its verdict says so (`InputResult.blocked_by`, ...).
"""

from __future__ import annotations


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
