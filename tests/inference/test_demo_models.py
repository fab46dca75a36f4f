"""The demo models: real architectures, random weights, labelled as such, byte-identical on every run."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference.demo_models import DEMO_SPECS, REQUIRED_FILES, is_complete, make_demo_models, train_tokenizer

DEMO_NAMES = tuple(DEMO_SPECS)
EXPECTED = {  # name -> (kind, model_type)
    "demo-moe": ("moe", "deepseek_v3"),
    "demo-distilled": ("distilled", "qwen2"),
    "demo-dense": ("dense", "llama"),
}


def _hashes(model_dir: Path) -> dict[str, str]:
    """Return the sha256 of every file in a model directory."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())}


@pytest.mark.parametrize("name", DEMO_NAMES)
def test_demo_models_are_labelled_random(demo_dir: Path, name: str) -> None:
    metadata = json.loads((demo_dir / name / "appliance.json").read_text())
    assert metadata["demo"] is True
    assert metadata["random_weights"] is True
    assert metadata["kind"] == EXPECTED[name][0]
    assert "random" in metadata["description"].lower()


@pytest.mark.parametrize("name", DEMO_NAMES)
def test_demo_models_have_every_file_and_no_remote_code(demo_dir: Path, name: str) -> None:
    model_dir = demo_dir / name
    assert is_complete(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == EXPECTED[name][1]
    assert "auto_map" not in config
    assert not list(model_dir.glob("*.py"))
    assert (model_dir / "model.safetensors").stat().st_size < 10 * 2**20


def test_moe_demo_has_latent_attention_and_routed_and_shared_experts(demo_dir: Path) -> None:
    config = json.loads((demo_dir / "demo-moe" / "config.json").read_text())
    for field in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        assert config[field] > 0
    assert (config["n_routed_experts"], config["num_experts_per_tok"]) == (16, 4)
    assert (config["n_shared_experts"], config["first_k_dense_replace"]) == (1, 1)
    assert config["num_hidden_layers"] == 3


def test_demo_models_are_deterministic(demo_dir: Path, tmp_path: Path) -> None:
    make_demo_models(tmp_path)
    for name in DEMO_NAMES:
        assert _hashes(tmp_path / name) == _hashes(demo_dir / name), name


def test_make_demo_models_writes_only_the_named_models(tmp_path: Path) -> None:
    written = make_demo_models(tmp_path, names=["demo-dense"])
    assert written == [tmp_path / "demo-dense"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-dense"]  # no staging directory left behind


def test_unknown_demo_model_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="demo-huge"):
        make_demo_models(tmp_path, names=["demo-huge"])


def test_a_directory_missing_a_file_is_not_complete(demo_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in REQUIRED_FILES[:-1]:
        (partial / name).write_bytes((demo_dir / "demo-dense" / name).read_bytes())
    assert not is_complete(partial)


@pytest.mark.parametrize("name", DEMO_NAMES)
def test_demo_models_load_offline_and_generate(demo_dir: Path, name: str) -> None:
    model_dir = demo_dir / name
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    prompt = tokenizer("Which variant fits this box?", return_tensors="pt").input_ids  # [1, T]
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt.shape[1]
    assert model.config.max_position_embeddings == 2048


def test_chat_template_ends_with_the_assistant_prompt(demo_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "demo-moe", local_files_only=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is my data?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhere is my data?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.eos_token == "<|im_end|>"


def test_generation_config_stops_on_im_end(demo_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "demo-distilled", local_files_only=True)
    generation = json.loads((demo_dir / "demo-distilled" / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]


def test_tokenizer_round_trips_text_outside_its_corpus(demo_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "demo-dense", local_files_only=True)
    text = "Naïve résumé: 日本語 🚀 — the ledger's Merkle root."
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_tokenizer_training_is_fast_and_deterministic() -> None:
    started = time.perf_counter()
    first, second = train_tokenizer(), train_tokenizer()
    assert time.perf_counter() - started < 5
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert 1000 <= len(first) <= 2000
