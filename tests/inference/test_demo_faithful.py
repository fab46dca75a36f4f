"""The demos are faithful to the configs they stand for, so other servers load them as they would the real
model: DeepSeek-V3's routing keys and score bias, head dims that attention kernels take, and a Qwen2 tokenizer
whose every id has an embedding row. And an id beyond the embedding is refused by the engine, not run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from transformers import AutoTokenizer

from inference.demo_models import DEMO_SPECS, QWEN2_ENDOFTEXT
from inference.engine import Engine, SamplingParams
from inference.engine.prompt import encode_text
from tests.inference.conftest import run

# Head sizes that the CPU attention kernels of vLLM and llama.cpp both take (24 and 48 are not among them).
KERNEL_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 192, 256}


def _config(demo_dir: Path, name: str) -> dict:
    return json.loads((demo_dir / name / "config.json").read_text())


@pytest.mark.parametrize("name", tuple(DEMO_SPECS))
def test_every_id_the_loaded_tokenizer_has_has_an_embedding_row(demo_dir: Path, name: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / name, local_files_only=True)  # the class transformers picks
    assert len(tokenizer) <= _config(demo_dir, name)["vocab_size"]


def test_the_qwen2_demo_has_the_endoftext_token_its_tokenizer_class_expects(demo_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "demo-distilled", local_files_only=True)
    endoftext = tokenizer.convert_tokens_to_ids(QWEN2_ENDOFTEXT)
    assert endoftext < _config(demo_dir, "demo-distilled")["vocab_size"]
    # The other demos keep the shared vocabulary unchanged.
    assert _config(demo_dir, "demo-dense")["vocab_size"] == endoftext


def test_the_moe_demo_routes_as_deepseek_v3_says_it_does(demo_dir: Path) -> None:
    config = _config(demo_dir, "demo-moe")
    assert (config["topk_method"], config["scoring_func"]) == ("noaux_tc", "sigmoid")
    with safe_open(demo_dir / "demo-moe" / "model.safetensors", "pt") as weights:
        biases = [k for k in weights.keys() if k.endswith("mlp.gate.e_score_correction_bias")]
        assert len(biases) == config["num_hidden_layers"] - config["first_k_dense_replace"]
        assert weights.get_tensor(biases[0]).shape == (config["n_routed_experts"],)


def test_attention_head_sizes_are_ones_the_kernels_take(demo_dir: Path) -> None:
    moe = _config(demo_dir, "demo-moe")
    assert moe["qk_nope_head_dim"] + moe["qk_rope_head_dim"] in KERNEL_HEAD_SIZES  # query/key heads
    # MLA's latent head as DeepSeek-V3's: the only size vLLM's CPU MLA decode kernel is built for.
    assert (moe["kv_lora_rank"], moe["qk_rope_head_dim"]) == (512, 64)
    for name in ("demo-distilled", "demo-dense"):
        config = _config(demo_dir, name)
        assert config["hidden_size"] // config["num_attention_heads"] in KERNEL_HEAD_SIZES, name


def test_the_engine_refuses_a_token_id_beyond_the_embedding_and_keeps_serving(demo_dir: Path, tmp_path: Path) -> None:
    # A model directory as the Qwen2 demo was: the tokenizer knows one token more than the embedding has rows.
    model_dir = tmp_path / "one-token-too-many"
    shutil.copytree(demo_dir / "demo-dense", model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    tokenizer.save_pretrained(model_dir)
    with Engine(model_dir, device="cpu", telemetry=False) as engine:
        # A raw prompt (a completion's): its control-token spellings are control tokens, as the caller wrote them.
        prompt = encode_text(engine.tokenizer, "say <|extra|>")
        assert engine.vocab_size in prompt
        with pytest.raises(ValueError, match=rf"token id {engine.vocab_size} is outside the vocabulary \[0, {engine.vocab_size}\)"):
            run(_answer(engine, prompt))
        answer = run(_answer(engine, engine.encode_chat([{"role": "user", "content": "say hello"}])))
        assert answer.completion_tokens > 0


async def _answer(engine: Engine, prompt: list[int]):
    chunks = [chunk async for chunk in engine.submit(prompt, SamplingParams(max_tokens=4, temperature=0))]
    return chunks[-1]
