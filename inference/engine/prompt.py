"""From a chat to prompt ids: the model's tokenizer and its chat template.

The engine process and the web process both tokenize (the web process to count and refuse before a request
crosses to the engine), so both load the tokenizer the same way, here.
"""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(model_dir: str | Path):
    """Return the model directory's tokenizer, from local files only and without the model's own code."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(model_dir), local_files_only=True, trust_remote_code=False)


def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Return the prompt ids for a chat, ending with the prompt for the assistant's turn.

    `tools` (OpenAI's function-tool objects) are rendered by the chat template where it can; a template
    without tool support leaves them out.
    """
    text = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False)
    # The template writes its own special tokens (BOS, turn markers); adding them again would double BOS.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_text(tokenizer, text: str) -> list[int]:
    """Return the prompt ids of raw text (a completion's prompt), with the tokenizer's own special tokens."""
    return tokenizer(text)["input_ids"]


def chat_template_source(tokenizer) -> str:
    """Return the chat template's source ("" without one): it tells whether and how the model calls tools."""
    template = tokenizer.chat_template
    if template is None:
        return ""
    return template if isinstance(template, str) else "\n".join(map(str, dict(template).values()))
