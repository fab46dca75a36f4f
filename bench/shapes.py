"""Write random-weight models of real models' shapes, so the benchmark measures arithmetic and memory
traffic of a real size, not only the per-step overhead of the few-MB demos.

    .venv/bin/python bench/shapes.py                      # both, under /work/.cache/bench/models
    .venv/bin/python bench/shapes.py --out DIR --names qwen2_5-0_5b-shape

qwen2_5-0_5b-shape (a variant name takes no '.'): Qwen2.5-0.5B's config as published (24 layers, hidden 896,
    14 query / 2 KV heads of 64, SwiGLU 4864, vocabulary 151,936, tied embeddings): 494M parameters.
deepseek-v3-shape: DeepSeek-V3's layer as published where it decides the cost per token — MLA with the
    real ranks (q_lora 1536, kv_lora 512, nope/rope/v head dims 128/64/128), routed experts of the real
    width (2048) with the real routing (sigmoid scores, noaux_tc with e_score_correction_bias, 8 groups,
    top-4 groups, top-8 experts, one shared expert) — scaled down in what only multiplies it: hidden 1024,
    8 heads, 3 layers (the first dense), 64 routed experts, a 32k vocabulary. 0.86B parameters.
Weights are random (seeded); the tokenizer is the demos' (a vocabulary smaller than the embedding, as real
checkpoints pad theirs). Written once: a complete directory is kept. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM, DeepseekV3Config, GenerationConfig, Qwen2Config  # noqa: E402

from inference.demo_models import METADATA_FILE, is_complete, tokenizer_for, train_tokenizer  # noqa: E402

DEFAULT_OUT = Path("/work/.cache/bench/models")


def qwen25_05b(tokenizer) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True, **_ids(tokenizer),
    )


def deepseek_v3_scaled(tokenizer) -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=32768, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=2048,
        num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=64, num_experts_per_tok=8,
        n_shared_experts=1, n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        topk_method="noaux_tc", scoring_func="sigmoid",
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_nextn_predict_layers=0,
        max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        **_ids(tokenizer),
    )


SHAPES = {"qwen2_5-0_5b-shape": (qwen25_05b, "qwen2", 2001), "deepseek-v3-shape": (deepseek_v3_scaled, "deepseek_v3", 2002)}


def _ids(tokenizer) -> dict:
    bos, eot, im_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|im_end|>"))
    return {"bos_token_id": bos, "eos_token_id": im_end, "pad_token_id": eot}


def write_shape(name: str, out_dir: Path) -> Path:
    target = out_dir / name
    if is_complete(target):
        return target
    make_config, model_type, seed = SHAPES[name]
    tokenizer = tokenizer_for(model_type, train_tokenizer())
    config = make_config(tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        ids = _ids(tokenizer)
        model.generation_config = GenerationConfig(bos_token_id=ids["bos_token_id"], pad_token_id=ids["pad_token_id"],
                                                   eos_token_id=[ids["eos_token_id"], ids["pad_token_id"]])
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        params = sum(p.numel() for p in model.parameters())
        (staging / METADATA_FILE).write_text(json.dumps(
            {"demo": True, "random_weights": True, "kind": "moe" if model_type == "deepseek_v3" else "dense",
             "description": f"RANDOM weights of a real model's shape ({name}, {params / 1e6:.0f}M parameters), "
                            "for the benchmark only."}, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


REAL_MODEL = "smollm2-135m"  # the real model the box ships with (appliance.bundled), converted once


def write_real_model(out_dir: Path) -> Path:
    """Write the bundled SmolLM2 GGUF as the model directory the appliance stores at its import (dequantized
    safetensors, tokenizer, chat template, by the appliance's own converter), so every server gets the same files."""
    target = out_dir / REAL_MODEL
    if (target / "config.json").is_file():
        return target
    import os
    import subprocess

    from appliance import bundled

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{REAL_MODEL}.", dir=out_dir))
    try:
        subprocess.run([sys.executable, "-m", "appliance.gguf_convert", str(bundled.gguf_path()), str(staging)],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "DJANGO_SETTINGS_MODULE": "appliance.settings", "TQDM_DISABLE": "1"})
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--names", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    for name in args.names:
        print(write_shape(name, args.out), flush=True)


if __name__ == "__main__":
    main()
