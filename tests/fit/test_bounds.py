"""The arithmetic bound on a config's model: exact against the meta-device build, refusing the absurd cheaply."""
import json
import re
import shutil

import pytest
import torch
from transformers import AutoConfig

from inference.fit import account, build_meta_model, load_source
from inference.fit.bounds import (
    EXACT_FAMILIES,
    ModelOutOfBounds,
    check_buildable,
    check_model_dir,
    implied_parameters,
)
from inference.fit.datasheets import largest_box

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=300)
MLA = dict(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=2,
           topk_group=1, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
FAMILIES = {
    "llama": ("llama", {}), "llama-biased": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "mistral": ("mistral", {}), "qwen2": ("qwen2", {}), "qwen3": ("qwen3", dict(head_dim=24)),
    "phi3": ("phi3", dict(pad_token_id=0)), "granite": ("granite", {}), "gemma": ("gemma", dict(head_dim=16)),
    "gemma2": ("gemma2", dict(head_dim=16)), "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=48, decoder_sparse_step=2, mlp_only_layers=[0])),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    mlp_only_layers=[2], head_dim=16)),
    "deepseek_v2": ("deepseek_v2", dict(MLA, n_shared_experts=1, first_k_dense_replace=1)),
    "deepseek_v3": ("deepseek_v3", dict(MLA, n_shared_experts=1, first_k_dense_replace=1)),
    "deepseek_v3-no-q-lora": ("deepseek_v3", dict(MLA, q_lora_rank=None, n_shared_experts=2, first_k_dense_replace=0)),
}


def test_every_exact_family_is_checked_here():
    assert {model_type for model_type, _ in FAMILIES.values()} == EXACT_FAMILIES


@pytest.mark.parametrize("case", FAMILIES)
def test_the_count_equals_the_meta_device_build(case):
    model_type, extra = FAMILIES[case]
    config = AutoConfig.for_model(model_type, **{**SMALL, **extra})
    accounting = account(build_meta_model(config, torch.bfloat16))
    implied = implied_parameters(config.to_dict())
    assert implied.exact
    # What the checkpoint stores: the built model plus DeepSeek's MTP modules (optional, transformers omits them).
    assert implied.total == accounting.total + accounting.mtp_disk_params
    assert implied.optional == accounting.mtp_disk_params


def test_deepseek_v3_counts_671b_plus_its_mtp_module():
    source = load_source("deepseek-v3")
    accounting = account(build_meta_model(source.config, torch.bfloat16))
    implied = implied_parameters(source.raw)
    assert implied.total == accounting.total + accounting.mtp_disk_params
    assert 684e9 < implied.total < 686e9  # DeepSeek's 685B checkpoint: 671B + 14B of MTP module


def test_an_unknown_architecture_gets_a_lower_bound():
    implied = implied_parameters({"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "vocab_size": 50257})
    assert not implied.exact
    assert implied.total == 50257 * 768 * 2 + 12 * 768


def test_it_refuses_a_model_no_known_box_holds_without_building_it():
    config = {"model_type": "llama", **SMALL, "num_hidden_layers": 10**9, "hidden_size": 8192,
              "intermediate_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8}
    label, capacity = largest_box()
    box = re.escape(f"{label}, {capacity:,.0f} GB")
    with pytest.raises(ModelOutOfBounds, match=r"num_hidden_layers=1,000,000,000.*" + box):
        check_buildable(config)


def test_it_refuses_a_directory_whose_weights_are_far_too_small(tmp_path, demo_dir):
    config = json.loads((demo_dir / "demo-dense" / "config.json").read_text())
    check_model_dir(demo_dir / "demo-dense", config)
    with pytest.raises(ModelOutOfBounds, match=r"num_hidden_layers=10,000,000.*files hold 0.004 GB"):
        check_model_dir(demo_dir / "demo-dense", {**config, "num_hidden_layers": 10_000_000})


@pytest.mark.parametrize("value", ["4", 4.0, -1, True, [4]])
def test_it_refuses_a_figure_that_is_not_a_whole_number(value):
    with pytest.raises(ModelOutOfBounds, match=f"num_hidden_layers must be a whole number.*{value!r}"):
        implied_parameters({"model_type": "llama", **SMALL, "num_hidden_layers": value})


def test_loading_a_directory_refuses_an_absurd_config_before_building(tmp_path, demo_dir):
    target = shutil.copytree(demo_dir / "demo-dense", tmp_path / "absurd")
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10_000_000}))
    with pytest.raises(ModelOutOfBounds, match="num_hidden_layers=10,000,000"):
        load_source(target)


def test_a_count_too_long_to_print_is_refused_by_its_order_of_magnitude():
    # 4,000-digit figures multiply into a count Python cannot print or turn into a float.
    config = {"model_type": "llama", **SMALL, "hidden_size": 10**4000, "intermediate_size": 10**4000}
    with pytest.raises(ModelOutOfBounds, match=r"implies about 10\^8\d\d\d parameters"):
        check_buildable(config)
