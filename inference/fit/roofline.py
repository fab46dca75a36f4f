"""Verdicts and throughput bounds: does a model fit a box, how many sequences, how many tokens/s at most."""

from __future__ import annotations

from dataclasses import dataclass

from .accounting import Accounting
from .experts import experts_hit
from .hardware import HardwareSpec

GB = 1e9
# Per-GPU allowance for the CUDA context, cuBLAS/NCCL workspaces and allocator slack. Not measurable on a
# CPU-only box, so it is an explicit, stated allowance rather than a hidden factor; `fit --reserve` changes it.
RUNTIME_RESERVE_GB_PER_GPU = 1.0
FITS, OFFLOAD, NO_FIT = "fits", "fits only with expert offload to CPU RAM", "does not fit"


@dataclass(frozen=True)
class ActivationModel:
    """Measured (meta-device) transient memory: prefill chunk peak and decode cost per sequence-token."""

    prefill_bytes: float  # transient peak of one prefill chunk
    prefill_tokens: int
    decode_base_bytes: float  # transient of a decode step, fixed part
    decode_bytes_per_seq_token: float  # transient of a decode step per sequence per cached token

    def decode_bytes(self, batch: int, context: int) -> float:
        """Return the transient bytes of one decode step of `batch` sequences at `context` tokens."""
        return self.decode_base_bytes + self.decode_bytes_per_seq_token * batch * context


@dataclass(frozen=True)
class Budget:
    """What must fit in device memory, in bytes, for one variant on one box."""

    weights: float
    routed_weights: float
    kv_per_token: float
    activation: ActivationModel
    reserve: float


def verdict(budget: Budget, hw: HardwareSpec, context: int) -> dict:
    """Return fits / offload / no-fit for one sequence at `context`, with margins and max concurrency."""
    device = hw.device_memory_gb * GB
    act = budget.activation
    fixed = budget.reserve + act.prefill_bytes + act.decode_base_bytes
    per_seq = context * (budget.kv_per_token + act.decode_bytes_per_seq_token)
    need = budget.weights + fixed + per_seq
    out = {"device_memory_gb": device / GB, "need_gb_one_sequence": need / GB, "margin_gb": (device - need) / GB,
           "host_ram_needed_gb": 0.0, "host_margin_gb": None}
    if need <= device:
        out.update(verdict=FITS, max_concurrent=int((device - budget.weights - fixed) // per_seq))
        return out
    gpu_need = need - budget.routed_weights
    if hw.accelerator is not None and budget.routed_weights and gpu_need <= device:
        host = hw.host_ram_gb
        host_ok = host is None or host * GB >= budget.routed_weights
        out.update(margin_gb=(device - gpu_need) / GB, host_ram_needed_gb=budget.routed_weights / GB,
                   host_margin_gb=None if host is None else (host * GB - budget.routed_weights) / GB)
        if host_ok:
            out.update(verdict=OFFLOAD,
                       max_concurrent=int((device - (budget.weights - budget.routed_weights) - fixed) // per_seq))
            return out
    # Not even offload works: the margin is the shortfall of holding everything on the device.
    out.update(verdict=NO_FIT, max_concurrent=0, margin_gb=(device - need) / GB)
    return out


@dataclass(frozen=True)
class StepCost:
    """Bytes and FLOPs of one forward token or step, split so rooflines can be drawn."""

    dense_bytes: float  # weights every step reads whatever the batch: attention, dense MLP, shared, head
    expert_bytes: float  # bytes of one routed expert
    moe_layers: int
    experts: int
    top_k: int
    flops_per_token: float  # 2 x active matmul parameters
    attention_flops_per_token_per_context: float  # scores + weighted sum, per cached token
    expand_flops_per_cached_token: float = 0.0  # MLA latent -> per-head K/V, redone for the whole cache each step


def decode_bound(cost: StepCost, kv_per_token: float, hw: HardwareSpec, batch: int, context: int,
                 offload: bool = False) -> dict:
    """Return the decode tokens/s upper bound at `batch` sequences from the bandwidth and FLOP rooflines."""
    hit = experts_hit(cost.experts, cost.top_k, batch) if cost.experts else 0.0
    expert_bytes = cost.moe_layers * hit * cost.expert_bytes
    kv_bytes = batch * context * kv_per_token
    flops = batch * (cost.flops_per_token + cost.attention_flops_per_token_per_context * context
                     + cost.expand_flops_per_cached_token * context)
    bandwidth = (hw.bandwidth_tbs or 0) * 1e12
    peak = (hw.bf16_tflops or 0) * 1e12
    if not bandwidth or not peak:
        return {"batch": batch, "tokens_per_s": None, "bound": "unknown hardware figures"}
    t_mem = (cost.dense_bytes + kv_bytes) / bandwidth
    if offload:
        # Offloaded experts are computed where they live (CPU RAM), at the host's bandwidth.
        t_mem += expert_bytes / ((hw.host_bandwidth_tbs or 0.1) * 1e12)
    else:
        t_mem += expert_bytes / bandwidth
    t_flop = flops / peak
    step_s = max(t_mem, t_flop)
    # tokens_per_s_memory is the bandwidth roofline the hardware allows; tokens_per_s also honours this
    # engine's FLOPs (with transformers' MLA re-expansion, decode turns compute-bound at long context).
    return {"batch": batch, "tokens_per_s": batch / step_s, "tokens_per_s_memory": batch / t_mem,
            "tokens_per_s_compute": batch / t_flop, "step_ms": step_s * 1e3,
            "bound": "memory" if t_mem >= t_flop else "compute",
            "bytes_per_step_gb": (cost.dense_bytes + expert_bytes + kv_bytes) / GB, "experts_hit_per_layer": hit}


def prefill_bound(cost: StepCost, hw: HardwareSpec, context: int) -> float | None:
    """Return the prefill tokens/s upper bound from peak FLOP/s (each token attends to context/2 on average)."""
    if not hw.bf16_tflops:
        return None
    # Prefill expands each latent once per chunk, not once per query token as decode does.
    flops = (cost.flops_per_token + cost.attention_flops_per_token_per_context * context / 2
             + cost.expand_flops_per_cached_token)
    return hw.bf16_tflops * 1e12 / flops


def step_cost(acc: Accounting, weight_by_component: dict[str, float], config, latent_cache: bool) -> StepCost:
    """Return the per-step bytes and per-token FLOPs of a model from its accounting and weight bytes."""
    routed = weight_by_component.get("routed_experts", 0.0)
    embedding = weight_by_component.get("embedding", 0.0) if not acc.tied_embeddings else 0.0
    dense = sum(weight_by_component.values()) - routed - embedding  # a decode step reads B embedding rows only
    moe = acc.moe
    expert_bytes = routed / (moe.experts * moe.moe_layers) if moe else 0.0
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    expand = 0
    if hasattr(config, "kv_lora_rank"):
        qk, v = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
        attn = 2 * layers * heads * (qk + v)
        if latent_cache:
            # transformers' DeepseekV3Attention.expand_kv runs kv_b_proj over every cached latent each step.
            expand = 2 * layers * config.kv_lora_rank * heads * (config.qk_nope_head_dim + v)
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        attn = 2 * layers * heads * 2 * head_dim
    return StepCost(dense, expert_bytes, moe.moe_layers if moe else 0, moe.experts if moe else 0,
                    moe.top_k if moe else 0, 2.0 * acc.active, float(attn), float(expand))
