"""Guardrails: input and output guards, the policy that drives them, streaming-aware checks.

The gateway uses `Guardrails` (guardrails.engine) built from a `Policy` (guardrails.policy);
everything in and out is plain data. See guardrails/README.md.
"""

from guardrails.base import (
    GUARDS,
    Guard,
    GuardContext,
    GuardResources,
    GuardSettings,
    Passage,
    Verdict,
    make_executor,
)
from guardrails.engine import (
    Guardrails,
    InputResult,
    InputText,
    OutputResult,
    PassageResult,
    StreamChecker,
    StreamStep,
    message_texts,
    structured_text,
)
from guardrails.errors import GuardrailsError, PolicyError, ScorerUnavailable
from guardrails.policy import Policy, RequestPolicy, default_policy, load_policy, parse_policy
from guardrails.toxicity import (
    DetoxifyScorer,
    ProfanityCheckScorer,
    ToxicityConfig,
    ToxicityScorer,
    build_scorer,
    wants_sentence_encoder,
)

__all__ = [
    "GUARDS",
    "DetoxifyScorer",
    "Guard",
    "GuardContext",
    "GuardResources",
    "GuardSettings",
    "Guardrails",
    "GuardrailsError",
    "InputResult",
    "InputText",
    "OutputResult",
    "Passage",
    "PassageResult",
    "Policy",
    "PolicyError",
    "ProfanityCheckScorer",
    "RequestPolicy",
    "ScorerUnavailable",
    "StreamChecker",
    "StreamStep",
    "ToxicityConfig",
    "ToxicityScorer",
    "Verdict",
    "build_scorer",
    "default_policy",
    "load_policy",
    "make_executor",
    "message_texts",
    "parse_policy",
    "structured_text",
    "wants_sentence_encoder",
]
