"""Loaded demo models shared by the fit tests (the demo directory comes from tests/conftest.py)."""
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@pytest.fixture(scope="session")
def loaded(demo_dir: Path):
    """Return a function that loads (once) a demo model and its tokenizer at a dtype."""
    cache = {}

    def load(name: str, dtype: torch.dtype = torch.float32):
        if (name, dtype) not in cache:
            model = AutoModelForCausalLM.from_pretrained(demo_dir / name, dtype=dtype).eval()
            cache[name, dtype] = model, AutoTokenizer.from_pretrained(demo_dir / name)
        return cache[name, dtype]

    return load
