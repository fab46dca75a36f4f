"""Turn generated token ids into text deltas that are safe to stream: whole characters, no stop strings.

Two small pieces, combined by `TextStream`: `IncrementalDetokenizer` never emits half of a UTF-8 character,
and `StopMatcher` never emits a stop string or anything that could still grow into one.
"""

from __future__ import annotations

from typing import Protocol

from tokenizers.decoders import DecodeStream

# What a tokenizer decodes an incomplete UTF-8 byte sequence to.
REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded along with the first generated ones, so tokenizers that drop a leading space at
# the start of a decode (SentencePiece-style) still give the first generated word its space.
PROMPT_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Decode a growing token list into text deltas, holding back text that ends in a partial character.

    A tokenizer backed by the Rust `tokenizers` library does this with its own incremental decoder, one call
    per token; any other decodes two short windows per token (what was emitted, and that plus the new token).
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        # Text of ids[prefix_offset:read_offset] has been emitted; ids[read_offset:] have not.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None if self._backend is None else DecodeStream(skip_special_tokens=True, ids=self._ids)

    def _decode(self, ids: list[int]) -> str:
        """Return the text of `ids`, leaving out special tokens such as the chat markers."""
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token and return the newly completed text (may be "")."""
        self._ids.append(token_id)
        if self._stream is not None:
            text = self._stream.step(self._backend, token_id)
            if text:
                self._prefix_offset = self._read_offset = len(self._ids)
            return text or ""
        # Decoding a short window instead of everything keeps each step O(window), not O(length).
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Return whatever text is still held back, partial characters included, at the end of generation."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Cut streamed text at the first stop string, holding back any tail that could begin one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def _held_length(self, text: str) -> int:
        """Return the length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = max((len(s) for s in self._stops), default=0)
        for size in range(min(len(text), longest - 1), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was found)."""
        self._pending += text
        # Any stop string starting in already-emitted text would have had its start held back, so searching
        # the pending text alone finds every match.
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        held = self._held_length(self._pending)
        cut = len(self._pending) - held
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        """Return the held-back tail once no more text can arrive."""
        out, self._pending = self._pending, ""
        return out


class TextStream:
    """Turn one request's generated tokens into emit-ready text deltas."""

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int], stops: tuple[str, ...]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopMatcher(stops)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one generated token; return (text delta, whether a stop string ended the answer)."""
        return self._stops.feed(self._detokenizer.push(token_id))

    def finish(self) -> tuple[str, bool]:
        """Return (the remaining text, whether a stop string was found in it) when generation ends."""
        text, stopped = self._stops.feed(self._detokenizer.flush())
        return (text, True) if stopped else (text + self._stops.flush(), False)
