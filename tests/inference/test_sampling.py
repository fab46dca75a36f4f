"""Sampling maths: greedy argmax, temperature, nucleus filtering, seeded draws."""

from __future__ import annotations

import pytest
import torch

from inference.engine.sampling import apply_penalties, logits_to_probs, make_generator, sample, sample_rows


def test_greedy_picks_the_argmax() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])  # [B=2, V=3]
    assert sample(logits, temperature=0, top_p=0.5, generator=None).tolist() == [1, 0]


def test_top_p_keeps_the_smallest_set_that_reaches_p() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    probs = logits_to_probs(logits, temperature=1.0, top_p=0.8)
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_top_p_always_keeps_the_most_likely_token() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert logits_to_probs(logits, temperature=1.0, top_p=1e-6).tolist() == [[0.0, 1.0, 0.0]]


def test_tiny_temperature_stays_finite() -> None:
    probs = logits_to_probs(torch.tensor([[1.0, 2.0, 3.0]]), temperature=1e-30)
    assert probs.tolist() == [[0.0, 0.0, 1.0]]


def test_higher_temperature_flattens_the_distribution() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    assert logits_to_probs(logits, 2.0).max() < logits_to_probs(logits, 1.0).max() < logits_to_probs(logits, 0.5).max()


def test_logits_to_probs_refuses_zero_temperature() -> None:
    with pytest.raises(ValueError, match="greedy"):
        logits_to_probs(torch.zeros(1, 4), temperature=0)


def test_seeded_generators_draw_the_same_tokens() -> None:
    logits = torch.randn(1, 500)

    def draws(seed: int) -> list[int]:
        generator = make_generator(seed, "cpu")
        return [int(sample(logits, 1.0, 0.95, generator)) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_a_denormal_top_p_still_keeps_the_most_likely_token() -> None:
    probs = logits_to_probs(torch.tensor([[0.0, 2.0, 1.0]]), temperature=1.0, top_p=5e-324)
    assert probs.tolist() == [[0.0, 1.0, 0.0]]


def test_top_k_keeps_only_the_k_most_likely_tokens() -> None:
    probs = logits_to_probs(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), temperature=1.0, top_k=2)
    assert (probs[0] > 0).tolist() == [False, True, False, True]
    assert torch.isclose(probs.sum(), torch.tensor(1.0))


def test_penalties_lower_tokens_already_generated() -> None:
    logits = torch.zeros(1, 4)
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0])
    out = apply_penalties(logits, counts, presence_penalty=0.5, frequency_penalty=0.25)
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0]]


def test_sample_rows_gives_each_row_its_own_parameters() -> None:
    from inference.engine.request import SamplingParams

    logits = torch.tensor([[0.0, 5.0, 1.0], [4.0, 0.0, 1.0], [0.0, 1.0, 9.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, frequency_penalty=2.0),
              SamplingParams(temperature=0.5, top_k=1, seed=1)]
    counts = [None, torch.tensor([3.0, 0.0, 0.0]), None]
    generators = [None, None, make_generator(1, "cpu")]
    assert sample_rows(logits, params, generators, counts) == [1, 2, 2]
