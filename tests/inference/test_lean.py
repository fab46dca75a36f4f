"""The lean forward of Llama-family models in plain mode: the logits of transformers' forward on the same
weights, bit for bit, in every precision, and transformers' forward kept wherever the lean one does not apply."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from inference.engine.cache import KVStore
from inference.engine.runner import Runner, load_model


def prompt(n: int) -> list[int]:
    return [(11 * i + 3 * n) % 1000 + 4 for i in range(n)]


def steps(runner: Runner) -> list[torch.Tensor]:
    """Run a prefill of mixed lengths, a chunk after cached tokens and three decode steps; return every logits."""
    prompts = [prompt(n) for n in (1, 7, 40)]
    stores = [KVStore(128, 128) for _ in prompts]
    with torch.inference_mode():
        out = [runner.step(stores, prompts)]
        out.append(runner.step(stores, [[5], prompt(9), [6]]))  # the middle request gets a 9-token chunk
        for _ in range(3):
            out.append(runner.step(stores, [[t] for t in out[-1].argmax(-1).tolist()]))
    return out


@pytest.mark.parametrize("name", ["demo-dense", "demo-distilled"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
def test_the_lean_forward_computes_transformers_logits_bit_for_bit(demo_dir: Path, name: str, precision: str) -> None:
    runner = Runner.prepare(load_model(demo_dir / name, "cpu", precision), exact=False)
    assert runner.lean is not None
    stock = dataclasses.replace(runner, lean=None)  # the same model, weights and packing, through transformers
    for lean_logits, stock_logits in zip(steps(runner), steps(stock), strict=True):
        assert torch.equal(lean_logits, stock_logits)


def test_other_architectures_and_exact_mode_keep_transformers_forward(demo_dir: Path, tmp_path: Path) -> None:
    assert Runner.prepare(load_model(demo_dir / "demo-moe", "cpu", "float32"), exact=False).lean is None
    assert Runner.prepare(load_model(demo_dir / "demo-dense", "cpu", "float32"), exact=True).lean is None
    # A Qwen2 model with a sliding-window layer: the lean forward has no window, so it is not used.
    sliding = tmp_path / "sliding"
    sliding.mkdir()
    for source in (demo_dir / "demo-distilled").iterdir():
        (sliding / source.name).write_bytes(source.read_bytes())
    config = json.loads((sliding / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=16,
                  layer_types=["sliding_attention"] * config["num_hidden_layers"])
    (sliding / "config.json").write_text(json.dumps(config))
    model = load_model(sliding, "cpu", "float32")
    assert "sliding_attention" in model.config.layer_types
    assert Runner.prepare(model, exact=False).lean is None
