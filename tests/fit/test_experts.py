"""Expected expert hits under uniform routing, against simulation and against a loaded MoE model."""
import random

import pytest
import torch

from inference.fit import experts_hit, idle_fraction, tokens_per_working_expert
from inference.fit.experts import batch_for_tokens_per_expert, compute_bound_tokens
from inference.fit.measure import measure_expert_hits


def test_formula_matches_a_simulation_of_uniform_routing():
    rng = random.Random(5)
    for tokens in (1, 8, 128):
        trials = [len({e for _ in range(tokens) for e in rng.sample(range(256), 8)}) for _ in range(400)]
        assert sum(trials) / len(trials) == pytest.approx(experts_hit(256, 8, tokens), rel=0.02)


def test_issue_figures_for_deepseek_v3():
    assert idle_fraction(256, 8, 8) == pytest.approx(0.78, abs=0.01)
    assert tokens_per_working_expert(256, 8, 128) == pytest.approx(4.1, abs=0.1)


def test_compute_bound_batch_follows_the_ridge_point():
    target = compute_bound_tokens(148 / 4.0, 1.0)  # H20, fp8 weights
    batch = batch_for_tokens_per_expert(256, 8, target)
    assert tokens_per_working_expert(256, 8, batch) >= target > tokens_per_working_expert(256, 8, batch - 1)


def test_measured_router_hits_sit_next_to_the_prediction(loaded):
    model, tokenizer = loaded("demo-moe")
    hits = measure_expert_hits(model, tokenizer, ["hello there", "the ledger"], new_tokens=3)
    assert all(c["assignments"] == c["tokens"] * 4 for c in hits.calls)
    summary = hits.summary()
    # A decode step of two sequences routes 2 tokens to 4 experts each: between 4 and 8 distinct experts.
    assert 4 <= summary[2]["measured_hit"] <= 8
    assert summary[2]["predicted_hit"] == pytest.approx(16 * (1 - (1 - 4 / 16) ** 2))
