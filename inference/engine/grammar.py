"""Constrained decoding: a grammar (JSON schema, JSON object) becomes a mask over the vocabulary at every step.

The grammar travels in SamplingParams as plain text (llguidance's grammar JSON, built by `json_schema_grammar`);
the engine compiles it into a `Constraint` when it admits the request, and the sampler masks the request's
logits with it before it picks a token (constraint.py). llguidance was chosen for its correctness on byte-level BPE
vocabularies and its broad JSON-schema coverage (see the README's structured-output section for the figures).

No Django here, and nothing from this module crosses a process boundary except grammar text. This module is the
grammar text alone (what the web process checks before a request is taken), so it loads neither torch nor
transformers: the mask over the vocabulary, which needs both, is constraint.py's.
"""

from __future__ import annotations

import contextlib
import json

import llguidance

# Compact JSON: a model free to emit whitespace between tokens may emit it for ever (random weights do).
JSON_OPTIONS = {"whitespace_flexible": False}
# Any JSON object, for response_format {"type": "json_object"}.
ANY_OBJECT = {"type": "object"}


class GrammarError(ValueError):
    """A schema or grammar that cannot be enforced; the message names the unsupported part."""


@contextlib.contextmanager
def library_errors():
    """Turn a panic of the grammar library's Rust core into a GrammarError.

    pyo3 raises a panic as PanicException, which derives from BaseException: left alone it would pass every
    `except Exception` guard and end the engine's worker thread, not just the one request.
    """
    try:
        yield
    except GrammarError:
        raise
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise GrammarError(f"the grammar library failed: {exc}") from None


def json_schema_grammar(schema: dict) -> str:
    """Return the grammar text that enforces `schema`, or raise GrammarError naming what cannot be enforced."""
    try:
        with library_errors():
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    except (ValueError, TypeError, RuntimeError) as exc:  # llguidance raises ValueError on malformed schemas
        raise GrammarError(str(exc)) from None
    check_grammar(grammar)
    return grammar


def check_grammar(grammar: str) -> None:
    """Raise GrammarError when grammar text cannot be compiled (without a vocabulary: cheap, any thread)."""
    with library_errors():
        problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise GrammarError(problem)
