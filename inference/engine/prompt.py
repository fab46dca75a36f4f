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


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Return the prompt ids for a chat, ending with the prompt for the assistant's turn."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template writes its own special tokens (BOS, turn markers); adding them again would double BOS.
    return tokenizer(text, add_special_tokens=False)["input_ids"]
