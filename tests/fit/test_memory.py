"""Weight, KV and activation predictions against what the loaded demo models allocate."""
import pytest
import torch

from inference.demo_models import DEMO_SPECS
from inference.fit import account, build_meta_model, forward_peak, load_source, measure_kv_bytes_per_token, measure_weights
from inference.fit.accounting import meta_model_for
from inference.fit.memory import allocated_bytes, kv_layout, weight_bytes


@pytest.mark.parametrize("name", sorted(DEMO_SPECS))
def test_predicted_weight_bytes_are_within_2_percent_of_allocated(name, demo_dir, loaded):
    model, _ = loaded(name)
    predicted = allocated_bytes(account(build_meta_model(load_source(demo_dir / name).config, torch.float32)))
    assert predicted == pytest.approx(measure_weights(model)["storage_bytes"], rel=0.02)


@pytest.mark.parametrize("name", sorted(DEMO_SPECS))
def test_predicted_kv_bytes_per_token_are_within_5_percent_of_measured(name, demo_dir, loaded):
    model, tokenizer = loaded(name)
    layout = kv_layout(build_meta_model(load_source(demo_dir / name).config, torch.float32))
    measured = measure_kv_bytes_per_token(model, tokenizer)
    assert layout.bytes_per_token(4.0)["engine"] == pytest.approx(measured["bytes_per_token"], rel=0.05)


def test_deepseek_v3_kv_shows_per_head_and_latent_sizes():
    kv = kv_layout(meta_model_for(load_source("deepseek-v3").config)).bytes_per_token(2.0)
    assert kv["per_head"] == 61 * 128 * (192 + 128) * 2  # ~5 MB per token
    assert kv["latent"] == 61 * (512 + 64) * 2  # ~70 KB per token
    assert kv["engine"] in (kv["latent"], kv["per_head"])  # whichever this transformers release writes


def test_stored_fp8_weights_read_the_quantization_config():
    src = load_source("deepseek-v3")
    acc = account(meta_model_for(src.config))
    stored = weight_bytes(acc, "stored", src.quantization, src.stored_dtype)
    assert stored.dtype == "stored (fp8)"
    assert stored.total == pytest.approx(weight_bytes(acc, "bf16").total / 2, rel=0.01)
    assert weight_bytes(acc, "int4").total < stored.total * 0.6


@pytest.mark.parametrize("name", ["demo-dense", "demo-distilled", "demo-moe"])
def test_meta_forward_peak_equals_the_measured_prefill_peak(name, demo_dir, loaded):
    model, _ = loaded(name, torch.bfloat16)
    model.set_attn_implementation("eager")  # the same kernels on both sides, so the bookkeeping is compared
    meta = build_meta_model(load_source(demo_dir / name).config, torch.bfloat16)
    meta.set_attn_implementation("eager")
    measured, predicted = forward_peak(model, 2, 64), forward_peak(meta, 2, 64)
    assert predicted.peak_bytes == measured.peak_bytes
    assert predicted.cache_bytes == measured.cache_bytes > 0
