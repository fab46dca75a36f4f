"""Constrained decoding: a grammar (JSON schema, JSON object) becomes a mask over the vocabulary at every step.

The grammar travels in SamplingParams as plain text (llguidance's grammar JSON, built by `json_schema_grammar`);
the engine compiles it into a `Constraint` when it admits the request, and the sampler masks the request's
logits with it before it picks a token. llguidance was chosen for its correctness on byte-level BPE
vocabularies and its broad JSON-schema coverage (see the README's structured-output section for the figures).

No Django here, and nothing from this module crosses a process boundary except grammar text.
"""

from __future__ import annotations

import contextlib
import json

import llguidance
import llguidance.hf
import torch

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


class GrammarVocabulary:
    """The model's vocabulary as the grammar library sees it, built once per engine (it walks every token)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int] | frozenset[int]) -> None:
        self.vocab_size = vocab_size  # the width of the logits, which the mask must match
        # A tokenizer may know more ids than the model has rows (an added token past the embedding); the grammar
        # library wants them all, and the mask keeps only the model's.
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=max(vocab_size, len(tokenizer)))
        # Every end-of-sequence id the engine stops on is allowed where the grammar may end, not only the
        # tokenizer's own eos_token.
        self.eos_token_ids = sorted(eos_token_ids)
        self._eos = frozenset(eos_token_ids)
        self.shifts = torch.arange(32, dtype=torch.int32)


class Constraint:
    """One request's grammar state: which tokens may come next, advanced by each sampled token."""

    def __init__(self, vocabulary: GrammarVocabulary, grammar: str) -> None:
        self.vocabulary = vocabulary
        with library_errors():
            self.matcher = llguidance.LLMatcher(vocabulary.tokenizer, grammar)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())

    def allowed(self) -> torch.Tensor:
        """Return the tokens that may come next as a bool mask [V]."""
        with library_errors():
            bitmask = self.matcher.compute_bitmask()
        words = torch.frombuffer(bytearray(bitmask), dtype=torch.int32)  # [ceil(V/32)]
        bits = ((words.unsqueeze(-1) >> self.vocabulary.shifts) & 1).bool().flatten()  # [32 * words]
        mask = bits[: self.vocabulary.vocab_size].clone()
        if self.matcher.is_accepting():
            mask[self.vocabulary.eos_token_ids] = True
        return mask

    def advance(self, token: int) -> None:
        """Feed the sampled token to the grammar (an end-of-sequence token where the grammar may end included)."""
        if token in self.vocabulary._eos and self.matcher.is_accepting():
            return
        with library_errors():
            consumed = self.matcher.consume_token(token)
        if not consumed:
            raise GrammarError(f"token {token} breaks the grammar: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """Return True when the grammar allows nothing more (the JSON value is closed)."""
        return self.matcher.is_stopped()
