"""Parameter accounting on the meta device against published figures and loaded models."""
import pytest
import torch

from inference.demo_models import DEMO_SPECS
from inference.fit import account, build_meta_model, count_parameters, load_source
from inference.fit.accounting import meta_model_for


@pytest.fixture(scope="module")
def deepseek():
    return account(meta_model_for(load_source("deepseek-v3").config))


def test_deepseek_v3_total_matches_the_published_671b(deepseek):
    assert deepseek.total == pytest.approx(671e9, rel=0.005)


def test_deepseek_v3_active_matches_the_published_37b(deepseek):
    assert deepseek.active == pytest.approx(37e9, rel=0.03)
    assert deepseek.active_with_embedding == pytest.approx(37e9, rel=0.03)
    # README_WEIGHTS.md: 36.6B activated, counting the output head but not the embedding lookup.
    assert deepseek.active == pytest.approx(36.6e9, rel=0.002)


def test_deepseek_v3_mtp_module_is_counted_apart(deepseek):
    assert deepseek.mtp_params == pytest.approx(11.5e9, rel=0.02)
    assert deepseek.on_disk_total == pytest.approx(685e9, rel=0.005)


def test_deepseek_v3_components_follow_the_architecture(deepseek):
    parts = deepseek.by_component
    assert deepseek.moe.experts == 256 and deepseek.moe.top_k == 8 and deepseek.moe.moe_layers == 58
    assert parts["routed_experts"] == 58 * 256 * 3 * 7168 * 2048  # fused gate_up_proj + down_proj
    assert parts["embedding"] == parts["lm_head"] == 129280 * 7168
    assert parts["router"] == 58 * 256 * 7168  # e_score_correction_bias is a buffer, not a parameter
    assert parts["other"] == 0


@pytest.mark.parametrize("name", sorted(DEMO_SPECS))
def test_demo_model_counts_equal_the_loaded_model_exactly(name, demo_dir, loaded):
    model, _ = loaded(name)
    predicted = account(build_meta_model(load_source(demo_dir / name).config, torch.float32))
    assert predicted.total == count_parameters(model)
    assert predicted.by_component["other"] == 0


def test_tied_embeddings_are_counted_once(demo_dir):
    acc = account(build_meta_model(load_source(demo_dir / "demo-distilled").config))
    assert acc.tied_embeddings and acc.by_component["lm_head"] == 0
