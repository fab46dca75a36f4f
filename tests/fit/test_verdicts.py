"""Verdicts, concurrency and bounds for DeepSeek-V3 and the demo models."""
import pytest

from inference.fit import analyze, recommend
from inference.fit.roofline import FITS, NO_FIT, OFFLOAD


@pytest.mark.parametrize("hardware,expected", [("8xH20", FITS), ("8xH200", FITS), ("cpu:1024G", FITS),
                                               ("cpu:512G", NO_FIT), ("2xRTX4090+cpu:256G", NO_FIT), ("2xRTX4090", OFFLOAD),
                                               ("4xA100-80G+cpu:1024G", OFFLOAD), ("8xH20", FITS)])
def test_deepseek_v3_verdicts(hardware, expected):
    report = analyze("deepseek-v3", hardware, 4096)
    assert report.verdict["verdict"] == expected
    assert (report.verdict["margin_gb"] >= 0) == (expected != NO_FIT)


def test_bf16_weights_fit_eight_h20_only_with_expert_offload():
    verdict = analyze("deepseek-v3", "8xH20", 4096, dtype="bf16").verdict
    assert verdict["verdict"] == OFFLOAD  # host RAM not stated: the report says how much it would need
    assert verdict["host_ram_needed_gb"] == pytest.approx(1307.8, rel=0.01)


def test_more_memory_holds_more_sequences_and_decodes_faster():
    h20, h200 = analyze("deepseek-v3", "8xH20", 4096), analyze("deepseek-v3", "8xH200", 4096)
    assert 0 < h20.verdict["max_concurrent"] < h200.verdict["max_concurrent"]
    assert h200.decode[0]["tokens_per_s_memory"] > h20.decode[0]["tokens_per_s_memory"]
    assert h200.prefill_tokens_per_s > h20.prefill_tokens_per_s


def test_recommendation_prefers_the_full_moe_only_where_it_serves_the_users(demo_dir):
    reports = [analyze(demo_dir / n, "cpu:64G", 1024) for n in ("demo-moe", "demo-distilled", "demo-dense")]
    assert recommend(reports, users=4).choice == "demo-moe"  # the largest model, and it fits
    tight = [analyze("deepseek-v3", "8xH20", 4096), analyze(demo_dir / "demo-dense", "8xH20", 4096)]
    rec = recommend(tight, users=500)
    assert rec.choice == "demo-dense" and "sequences" in rec.reasons["deepseek-v3"]
