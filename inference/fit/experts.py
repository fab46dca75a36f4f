"""Expected expert use of a Mixture-of-Experts layer per decode step, on one box and under expert parallelism."""

from __future__ import annotations

from dataclasses import dataclass

# DeepSeek's own serving units (DeepSeek-V3/R1 Inference System Overview, deepseek-ai/open-infra-index,
# 202502OpenSourceWeek day 6): prefill EP32 over 4 nodes, decode EP144 over 18 nodes of 8 H800.
DEEPSEEK_DECODE_UNIT_GPUS = 144
DEEPSEEK_PREFILL_UNIT_GPUS = 32


def experts_hit(experts: int, top_k: int, tokens: float) -> float:
    """Return the expected number of distinct experts a layer uses for `tokens` tokens under uniform routing."""
    # Each token picks k of E; an expert is missed by one token with probability 1 - k/E, by all with (1-k/E)^B.
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def idle_fraction(experts: int, top_k: int, tokens: float) -> float:
    """Return the expected fraction of a layer's experts that receive no token."""
    return 1.0 - experts_hit(experts, top_k, tokens) / experts


def tokens_per_working_expert(experts: int, top_k: int, tokens: float) -> float:
    """Return the mean number of tokens each expert that does work receives."""
    return tokens * top_k / experts_hit(experts, top_k, tokens)


def compute_bound_tokens(ridge_flop_per_byte: float, weight_bytes_per_param: float) -> float:
    """Return the tokens an expert needs per step before its matmuls stop being memory-bound."""
    # An expert with P parameters does 2*P FLOPs per token and reads P*bytes once per step, so its
    # arithmetic intensity is 2*t/bytes FLOP/byte; it leaves the memory-bound side at the ridge point.
    return ridge_flop_per_byte * weight_bytes_per_param / 2.0


def batch_for_tokens_per_expert(experts: int, top_k: int, target: float, limit: int = 10**8) -> int | None:
    """Return the smallest step batch whose working experts each see at least `target` tokens."""
    if target <= 1.0:
        return 1
    lo, hi = 1, 1
    while tokens_per_working_expert(experts, top_k, hi) < target:
        hi *= 2
        if hi > limit:
            return None
    while lo < hi:  # tokens per working expert grows with the batch, so bisect
        mid = (lo + hi) // 2
        if tokens_per_working_expert(experts, top_k, mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class ExpertStep:
    """Expert use of one MoE layer for one decode step of `tokens` tokens."""

    tokens: int
    hit: float
    idle_fraction: float
    tokens_per_working_expert: float


def step(experts: int, top_k: int, tokens: int) -> ExpertStep:
    """Return the expert use of one decode step of `tokens` tokens."""
    return ExpertStep(tokens, experts_hit(experts, top_k, tokens), idle_fraction(experts, top_k, tokens),
                      tokens_per_working_expert(experts, top_k, tokens))


def expert_table(experts: int, top_k: int, batches: list[int], gpus_box: int, gpus_ep: int,
                 ridge_flop_per_byte: float, weight_bytes_per_param: float) -> dict:
    """Return idle fraction and tokens per working expert against sequences per GPU, box vs EP cluster."""
    # Attention runs data-parallel in both set-ups, so each GPU decodes b sequences; the experts of a
    # layer then see the tokens of every GPU in the group: gpus_box * b on one box, gpus_ep * b in EP.
    target = compute_bound_tokens(ridge_flop_per_byte, weight_bytes_per_param)
    rows = []
    for b in batches:
        box, ep = step(experts, top_k, gpus_box * b), step(experts, top_k, gpus_ep * b)
        rows.append({"seqs_per_gpu": b, "box": vars(box), "ep": vars(ep)})
    needed = batch_for_tokens_per_expert(experts, top_k, target)
    return {
        "experts": experts, "top_k": top_k, "gpus_box": gpus_box, "gpus_ep": gpus_ep,
        "compute_bound_tokens_per_expert": target,
        "step_batch_for_compute_bound": needed,
        "seqs_per_gpu_for_compute_bound_box": None if needed is None else -(-needed // max(1, gpus_box)),
        "seqs_per_gpu_for_compute_bound_ep": None if needed is None else -(-needed // gpus_ep),
        "rows": rows,
    }
