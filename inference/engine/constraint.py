"""A request's grammar as the engine applies it: the model's vocabulary as the grammar library sees it, and the
mask of the tokens that may come next, advanced by each sampled token.

Apart from grammar.py because it needs torch and transformers' tokenizer (llguidance.hf), which the web process,
checking grammar text before it takes a request, never loads.
"""

from __future__ import annotations

import llguidance
import llguidance.hf
import torch

from inference.engine.grammar import GrammarError, library_errors


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
