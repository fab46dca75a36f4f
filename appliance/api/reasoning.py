"""Reasoning models (DeepSeek-R1 and its distills): the <think>…</think> section goes to `reasoning_content`.

As DeepSeek's own API does, the answer's reasoning is `message.reasoning_content` (`delta.reasoning_content`
when streaming) and only what follows `</think>` is `content`. A template that opens the section itself (its
generation prompt ends with `<think>`) starts the answer inside it; otherwise an answer that begins with
`<think>` opens it. An answer cut before `</think>` is all reasoning.
"""
from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def template_reasons(template: str) -> bool:
    """Return True when a chat template marks a reasoning section."""
    return CLOSE in template or OPEN in template


def split_reasoning(text: str, starts_inside: bool) -> tuple[str | None, str]:
    """Return (reasoning, content) of a whole answer; reasoning is None when the answer has no section."""
    if not starts_inside:
        stripped = text.lstrip()
        if not stripped.startswith(OPEN):
            return None, text
        text = stripped[len(OPEN):]
    reasoning, closed, content = text.partition(CLOSE)
    # Kept as written (a stream cannot take back what it sent); only the break after </think> is dropped.
    return reasoning, content.lstrip("\n") if closed else ""


class ReasoningStream:
    """Split a streamed answer into reasoning and content deltas, holding back a `</think>` split across chunks."""

    def __init__(self, starts_inside: bool):
        self.inside = starts_inside
        self.opened = starts_inside
        self.undecided = not starts_inside  # may still open with <think>
        self.pending = ""

    def push(self, text: str) -> list[tuple[str, str]]:
        """Return the (field, text) deltas that `text` completes: field is reasoning_content or content."""
        self.pending += text
        out: list[tuple[str, str]] = []
        if self.undecided:
            stripped = self.pending.lstrip()
            if OPEN.startswith(stripped):  # still could be the opening tag (or only whitespace so far)
                return out
            self.undecided = False
            if stripped.startswith(OPEN):
                self.inside = self.opened = True
                self.pending = stripped[len(OPEN):]
        if self.inside:
            before, closed, after = self.pending.partition(CLOSE)
            if closed:
                self.inside, self.pending = False, after.lstrip("\n")
                if before:
                    out.append(("reasoning_content", before))
            else:
                keep = next((k for k in range(min(len(CLOSE) - 1, len(before)), 0, -1)
                             if CLOSE.startswith(before[-k:])), 0)
                if len(before) > keep:
                    out.append(("reasoning_content", before[:len(before) - keep]))
                self.pending = before[len(before) - keep:]
                return out
        if self.pending:
            out.append(("content", self.pending))
            self.pending = ""
        return out

    def finish(self) -> list[tuple[str, str]]:
        """Return what is still held back, at the end of the answer."""
        if not self.pending:
            return []
        field = "reasoning_content" if self.inside else "content"
        text, self.pending = self.pending, ""
        return [(field, text)]
