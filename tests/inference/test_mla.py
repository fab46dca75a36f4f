"""Absorbed multi-head latent attention (DeepSeek-V3) in plain mode: the same logits as transformers' own forward,
one latent per token in the cache, and no expansion of the history at a decode step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.engine.cache import KVStore
from inference.engine.mla import install_absorbed_mla
from inference.engine.precision import weight_bytes
from inference.engine.runner import Runner, load_model

# Prompt lengths on both sides of demo-moe's absorb_below (73): short ones absorb, 200 expands its history.
PROMPT_LENGTHS = (1, 5, 30, 200)


def prompt(n: int) -> list[int]:
    return [(7 * i + 3 * n) % 1000 + 4 for i in range(n)]


def stock_logits(runner: Runner, ids: list[int]) -> torch.Tensor:
    """Return the last position's logits of transformers' own forward (outside a step) on the same model."""
    return runner.model(torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_batched_steps_give_the_logits_of_transformers_forward(demo_dir: Path, precision: str) -> None:
    runner = Runner.prepare(load_model(demo_dir / "demo-moe", "cpu", precision), exact=False)
    assert all(hasattr(m, "stock_forward") for m in runner.model.modules() if type(m).__name__ == "DeepseekV3Attention")
    tolerance = 1e-4 if precision == "float32" else 3e-2  # int8 absorbs the dequantized bf16 weight
    prompts = [prompt(n) for n in PROMPT_LENGTHS]
    stores = [KVStore(300, 300) for _ in prompts]
    with torch.inference_mode():
        logits = runner.step(stores, prompts)  # a prefill of every length in one step
        for ids, row in zip(prompts, logits):
            torch.testing.assert_close(row, stock_logits(runner, ids), rtol=tolerance, atol=tolerance)
        for _ in range(4):  # decode steps: every request absorbs
            for ids, token in zip(prompts, logits.argmax(-1).tolist()):
                ids.append(token)
            logits = runner.step(stores, [[ids[-1]] for ids in prompts])
            for ids, row in zip(prompts, logits):
                torch.testing.assert_close(row, stock_logits(runner, ids), rtol=tolerance, atol=tolerance)


def test_the_cache_holds_one_latent_and_rope_key_per_token_and_layer(demo_dir: Path) -> None:
    runner = Runner.prepare(load_model(demo_dir / "demo-moe", "cpu", "float32"), exact=False)
    config = runner.model.config
    per_token = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 4  # float32
    assert runner.kv_bytes_per_token() == per_token


def test_a_decode_step_never_expands_the_history(demo_dir: Path) -> None:
    runner = Runner.prepare(load_model(demo_dir / "demo-moe", "cpu", "float32"), exact=False)
    expanded_rows: list[int] = []
    for module in runner.model.modules():
        if type(module).__name__ == "DeepseekV3Attention":
            module.kv_b_proj.register_forward_hook(lambda mod, args, out: expanded_rows.append(args[0].shape[-2]))
    prompts = [prompt(200), prompt(30)]
    stores = [KVStore(300, 300) for _ in prompts]
    with torch.inference_mode():
        runner.step(stores, prompts)
        layers = runner.model.config.num_hidden_layers
        assert expanded_rows == [200] * layers  # the long prompt expands its own history; the short one absorbs
        expanded_rows.clear()
        runner.step(stores, [[5], [6]])
    assert expanded_rows == []


def test_exact_mode_keeps_transformers_attention(demo_dir: Path) -> None:
    runner = Runner.prepare(load_model(demo_dir / "demo-moe", "cpu", "float32"), exact=True)
    assert not any(hasattr(m, "stock_forward") for m in runner.model.modules())
    assert install_absorbed_mla(load_model(demo_dir / "demo-dense", "cpu", "float32")) == 0


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_absorbing_reads_kv_b_proj_in_place_and_holds_no_second_copy(demo_dir: Path, precision: str) -> None:
    model = load_model(demo_dir / "demo-moe", "cpu", precision)
    attention = [m for m in model.modules() if type(m).__name__ == "DeepseekV3Attention"]
    before = weight_bytes(model) - sum(m.kv_b_proj.weight.numel() * m.kv_b_proj.weight.element_size() for m in attention)
    Runner.prepare(model, exact=False)
    # kv_b_proj stays a plain layer (never packed for oneDNN: W_UK and W_UV are views of its weight) ...
    assert all(isinstance(m.kv_b_proj, torch.nn.Linear) for m in attention)
    # ... and nothing beside it holds its numbers again (the other weights may be packed: bytes of theirs only).
    assert not any(name.startswith("absorbed") for m in attention for name, _ in m.named_buffers())
    after = weight_bytes(model) - sum(m.kv_b_proj.weight.numel() * m.kv_b_proj.weight.element_size() for m in attention)
    if precision == "float32":
        assert after == before
