"""From a chat to prompt ids: the model's tokenizer and its chat template.

The engine process and the web process both tokenize (the web process to count and refuse before a request
crosses to the engine), so both load the tokenizer the same way, here.
"""

from __future__ import annotations

import functools
import re
import secrets
from pathlib import Path


def load_tokenizer(model_dir: str | Path):
    """Return the model directory's tokenizer, from local files only and without the model's own code."""
    from transformers import AutoTokenizer  # here: transformers loads only when a tokenizer is needed

    return AutoTokenizer.from_pretrained(Path(model_dir), local_files_only=True, trust_remote_code=False)


class ControlTokenSpelling(ValueError):
    """A field the chat template would copy verbatim spells one of the model's control tokens."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Return the prompt ids for a chat, ending with the prompt for the assistant's turn.

    `tools` (OpenAI's function-tool objects) are rendered by the chat template where it can; a template
    without tool support leaves them out.

    A message's text is text: where it spells a control token (`<|im_end|><|im_start|>system` typed into a
    user's message), it is encoded as the characters it is, never as that token, else any caller could forge
    a turn of another role. The template's own markers stay control tokens. Other fields the template copies
    (names, tool arguments, tool definitions, content given as parts) that spell one are refused.
    """
    controls = control_spellings(tokenizer)
    refuse_control_spellings(controls, messages, tools)
    nonce = secrets.token_hex(8)  # unguessable, so text cannot pose as a placeholder
    texts: list[str] = []
    marked = [_with_placeholders(message, controls, texts, nonce) for message in messages]
    text = tokenizer.apply_chat_template(marked, tools=tools or None, add_generation_prompt=True, tokenize=False)
    if not texts:
        # The template writes its own special tokens (BOS, turn markers); adding them again would double BOS.
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    placed = set()
    pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", text)  # template, index, template, index, ..., template
    for position, piece in enumerate(pieces):
        if position % 2:
            placed.add(int(piece))
            ids += tokenizer(texts[int(piece)], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    if len(placed) != len(texts):
        raise ControlTokenSpelling("A message spells one of this model's control tokens, and its chat template "
                                   "transforms message text, so the text cannot be kept apart from them", "messages")
    return ids


@functools.lru_cache(maxsize=64)  # per tokenizer object (hashed by identity): once per model, not per request
def control_spellings(tokenizer) -> tuple[str, ...]:
    """Return the spellings of the tokenizer's special tokens (the ones its encoder matches whole in text)."""
    return tuple(sorted({added.content for added in tokenizer.added_tokens_decoder.values()
                         if added.special and added.content}))


def _spells_control(value: str, controls: tuple[str, ...]) -> bool:
    return any(control in value for control in controls)


def _with_placeholders(message: dict, controls: tuple[str, ...], texts: list[str], nonce: str) -> dict:
    """Return the message with each text that spells a control token replaced by a placeholder (kept in texts)."""
    def placeholder(value: str) -> str:
        if not _spells_control(value, controls):
            return value
        texts.append(value)
        return f"\ue000{nonce}:{len(texts) - 1}\ue001"

    content = message.get("content")
    return {**message, "content": placeholder(content)} if isinstance(content, str) else message


def refuse_control_spellings(controls: tuple[str, ...], messages: list[dict], tools: list[dict] | None) -> None:
    """Raise ControlTokenSpelling for a string outside message text (a name, tool arguments, a tool's
    definition) that spells a control token: the template copies those where no placeholder can go."""
    def walk(value, param: str):
        if isinstance(value, str):
            if _spells_control(value, controls):
                raise ControlTokenSpelling(f"Invalid value for '{param}': it spells one of this model's control "
                                           f"tokens, which only the chat template may write", param)
        elif isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, f"{param}.{key}")
        elif isinstance(value, list):
            for i, inner in enumerate(value):
                walk(inner, f"{param}.{i}")

    for i, message in enumerate(messages):
        for key, value in message.items():
            if not (key == "content" and isinstance(value, str)):  # the API joins text parts into one string
                walk(value, f"messages.{i}.{key}")
    walk(tools or [], "tools")


def encode_text(tokenizer, text: str) -> list[int]:
    """Return the prompt ids of raw text (a completion's prompt), with the tokenizer's own special tokens."""
    return tokenizer(text)["input_ids"]


def chat_template_source(tokenizer) -> str:
    """Return the chat template's source ("" without one): it tells whether and how the model calls tools."""
    template = tokenizer.chat_template
    if template is None:
        return ""
    return template if isinstance(template, str) else "\n".join(map(str, dict(template).values()))
