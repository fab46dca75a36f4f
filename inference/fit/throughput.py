"""Predict what a deployment delivers: output and total tokens/s, TPOT and TTFT for a workload, with the bound and
the uncertainty, from the bytes and FLOPs a step touches and efficiency factors fitted to published measurements.

The step model, per replica of the weights:
  decode step = layers x tau (kernel launches, synchronisation: a fixed cost per layer)
              + max(bytes read per GPU / (bandwidth x eta_bw), FLOPs per GPU / (peak x mfu))
              + communication (TP all-reduce over NVLink, EP all-to-all over NVLink and the network)
              + host time of offloaded experts;
  prefill per prompt token = FLOPs / (GPUs x peak x mfu) + weight reads per chunk + communication.
Bytes per step: the weights the batch touches (for MoE the experts its tokens hit, experts.experts_hit),
the KV cache of each GPU's sequences (replicated on every GPU of a TP group for MLA's single latent head),
and nothing else worth counting. A closed loop of C users completes C requests in
  R = C x prompt tokens x prefill time + output tokens x decode step(C),
which gives output tokens/s = C x out / R, TPOT and TTFT. tau, eta_bw and mfu are the efficiency factors of
one engine on one hardware class, fitted in calibration.py; this module does not know where they come from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .datasheets import CPU_HOST
from .experts import experts_hit
from .hardware import HardwareSpec
from .interconnect import links_for
from .parallel import Plan
from .profile import ModelProfile
from .workload import Workload

ENGINES = ("builtin", "vllm", "sglang")
# Fraction of each GPU's memory the serving engines take for weights, activations and cache (vLLM's
# gpu_memory_utilization default 0.9; SGLang's mem_fraction_static is chosen near it). A model that only fits
# above it is planned at TIGHT_MEMORY_FRACTION, the setting operators raise it to, and the prediction says so.
MEMORY_FRACTION = 0.9
TIGHT_MEMORY_FRACTION = 0.95
ACTIVATION_ALLOWANCE_GB = 2.0  # per GPU: a prefill chunk's activations and CUDA graphs
PREFILL_CHUNK_TOKENS = 8192  # vLLM's default max_num_batched_tokens on large GPUs: weights are read once per chunk
ACTIVATION_BYTES = 2  # bf16 activations cross the links
DISPATCH_BYTES = 1  # DeepEP dispatches tokens in FP8 and combines them in bf16
# Attention runs in fused flash kernels whose efficiency is published, unlike the engines' MoE and GEMM paths:
# FlashAttention-3 (Shah et al., 2024, arXiv 2407.08608) reaches 740 TFLOP/s in BF16 on H100, 75% of peak.
ATTENTION_EFFICIENCY = 0.75
HOST_EFFICIENCY = 0.5  # offloaded experts: fraction of host peak bandwidth/FLOP/s reached (assumed, not fitted)


@dataclass(frozen=True)
class EngineParams:
    """Efficiency factors of one engine on one hardware class, and how far its predictions can be trusted."""

    bw_efficiency: float  # fraction of peak memory bandwidth a decode step reaches
    layer_overhead_us: float  # fixed cost per layer and step
    mfu: float  # fraction of dense BF16 peak the matmuls reach
    request_overhead_ms: float  # serial server time per request (chat template, tokenizer, scheduling)
    uncertainty: float  # relative: the prediction is within x/(1+u) .. x*(1+u) of what was measured
    basis: str  # where the factors came from

    def to_dict(self) -> dict:
        """Return the factors as JSON-ready values."""
        return asdict(self)


# The bound: perfect kernels, no fixed cost. A prediction never exceeds it.
ROOFLINE = EngineParams(1.0, 0.0, 1.0, 0.0, 0.0, "roofline: peak bandwidth and FLOP/s, no fixed costs")


@dataclass(frozen=True)
class Capacity:
    """Whether a plan holds the model, and how many sequences of a context length it holds."""

    fits: bool
    sequences: int  # per replica
    weights_gb_per_gpu: float
    free_gb_per_gpu: float
    reason: str = ""
    memory_fraction: float = MEMORY_FRACTION


def capacity(profile: ModelProfile, hw: HardwareSpec, plan: Plan, context: int, kv_per_token: float,
             wanted: int = 1) -> Capacity:
    """Return how many sequences of `context` tokens one replica holds, or why the plan does not fit; when the
    usual memory fraction holds fewer than `wanted` sequences per replica, the tight one is planned instead."""
    cap = _capacity(profile, hw, plan, context, kv_per_token, MEMORY_FRACTION)
    if cap.sequences < wanted and hw.accelerator:
        tight = _capacity(profile, hw, plan, context, kv_per_token, TIGHT_MEMORY_FRACTION)
        if tight.sequences > cap.sequences:
            return tight
    return cap


def _capacity(profile: ModelProfile, hw: HardwareSpec, plan: Plan, context: int, kv_per_token: float,
              fraction: float) -> Capacity:
    """Return the capacity when the engine may use `fraction` of each GPU's memory."""
    g = plan.replica_gpus
    memory = hw.accelerator.memory_gb if hw.accelerator else (hw.host_ram_gb or 0.0)
    on_gpu = profile.weight_gb - (profile.routed_gb if plan.offload else 0.0)
    # Data-parallel attention keeps a whole copy of the attention weights on every GPU of its group.
    per_gpu = (on_gpu - profile.attention_gb) / g + profile.attention_gb / plan.attention_tp
    usable = memory * fraction - ACTIVATION_ALLOWANCE_GB
    free = usable - per_gpu
    if plan.offload:
        host = hw.host_ram_gb
        if host is not None and host * MEMORY_FRACTION < profile.routed_gb:
            return Capacity(False, 0, per_gpu, free, f"offload needs {profile.routed_gb:,.0f} GB of host RAM for the "
                                                     f"routed experts; the box has {host:,.0f} GB")
    if free <= 0:
        return Capacity(False, 0, per_gpu, free, f"weights take {per_gpu:,.1f} GB per GPU, more than the "
                                                 f"{usable:,.1f} GB usable at {fraction:.0%} of each GPU's memory")
    per_sequence = context * kv_per_token / min(plan.attention_tp, profile.kv_heads) / 1e9
    sequences = int(free // per_sequence) * plan.attention_dp
    if sequences < 1:
        return Capacity(False, 0, per_gpu, free, f"no room for one sequence of {context:,} tokens "
                                                 f"({per_sequence:,.1f} GB of KV per GPU, {free:,.1f} GB free)")
    return Capacity(True, sequences, per_gpu, free, memory_fraction=fraction)


def _attention_efficiency(params: EngineParams) -> float:
    """Return the attention kernels' fraction of peak (the roofline bound assumes peak everywhere)."""
    return 1.0 if params is ROOFLINE else ATTENTION_EFFICIENCY


def _host(hw: HardwareSpec) -> tuple[float, float]:
    """Return the (bytes/s, FLOP/s) offloaded experts run at: the stated host, else the datasheet host."""
    bandwidth = hw.host_bandwidth_tbs or CPU_HOST["bandwidth_tbs"]
    peak = hw.host_bf16_tflops or CPU_HOST["bf16_tflops"]
    return bandwidth * 1e12 * HOST_EFFICIENCY, peak * 1e12 * HOST_EFFICIENCY


def _device(hw: HardwareSpec) -> tuple[float, float]:
    """Return (bytes/s, FLOP/s) of one GPU, or of the host for a CPU-only box."""
    if hw.accelerator:
        return hw.accelerator.bandwidth_tbs * 1e12, hw.accelerator.bf16_tflops * 1e12
    return (hw.host_bandwidth_tbs or 0.1) * 1e12, (hw.host_bf16_tflops or 1.0) * 1e12


def _comm_s_per_token(profile: ModelProfile, hw: HardwareSpec, plan: Plan) -> float:
    """Return the link time one token costs a replica per forward pass (TP collectives or EP all-to-all)."""
    g = plan.replica_gpus
    if g <= 1 or not hw.accelerator:
        return 0.0
    links = links_for(hw.accelerator.name)
    per_box = max(1, hw.gpus_per_box)
    total = 0.0
    tp_group = plan.attention_tp if plan.experts == "ep" else g
    if tp_group > 1:
        # Two collectives per layer (after attention, after the MLP), each a ring all-reduce (or the all-gather
        # and reduce-scatter of DP attention, the same bytes): 2(n-1)/n of the activations cross each GPU's link.
        link = links.in_box_gbs if tp_group <= per_box else links.between_boxes_gbs
        total += 2 * profile.layers * 2 * (tp_group - 1) / tp_group * profile.hidden * ACTIVATION_BYTES / (link * 1e9)
    if plan.experts == "ep" and profile.experts:
        # Each token goes to k experts and comes back: the share on other GPUs of this box crosses NVLink,
        # the share in other boxes crosses the network. The work spreads over all g GPUs.
        in_box = (min(per_box, g) - 1) / g
        off_box = max(0, g - per_box) / g
        per_token = profile.top_k * profile.hidden * (DISPATCH_BYTES + ACTIVATION_BYTES)
        total += profile.moe_layers * per_token * (in_box / (links.in_box_gbs * 1e9)
                                                   + off_box / (links.between_boxes_gbs * 1e9)) / g
    return total


def decode_step(profile: ModelProfile, hw: HardwareSpec, plan: Plan, params: EngineParams, batch: int, context: float,
                kv_per_token: float) -> dict:
    """Return the decode step time of one replica decoding `batch` sequences at `context` tokens, by component."""
    g = plan.replica_gpus
    bandwidth, peak = _device(hw)
    groups = plan.attention_dp
    seqs_per_group = batch / groups
    kv = seqs_per_group * context * kv_per_token / min(plan.attention_tp, profile.kv_heads)
    hit = experts_hit(profile.experts, profile.top_k, batch) if profile.experts else 0.0
    expert_bytes = profile.moe_layers * hit * profile.expert_gb * 1e9
    weights = profile.attention_gb * 1e9 / plan.attention_tp + profile.dense_gb * 1e9 / g
    routed_flops = 2.0 * profile.routed_active_params
    matmul = profile.matmul_flops_per_token - (routed_flops if plan.offload else 0.0)
    attention_flops = seqs_per_group * profile.attention_decode_flops_per_context * context / plan.attention_tp
    gpu_bytes = kv + weights + (0.0 if plan.offload else expert_bytes / g)
    memory_s = gpu_bytes / (bandwidth * params.bw_efficiency)
    compute_s = batch * matmul / g / (peak * params.mfu) + attention_flops / (peak * _attention_efficiency(params))
    comm_s = batch * _comm_s_per_token(profile, hw, plan)
    host_s = 0.0
    if plan.offload:
        host_bw, host_peak = _host(hw)
        host_s = expert_bytes / host_bw + batch * routed_flops / host_peak
    fixed_s = profile.layers * params.layer_overhead_us * 1e-6
    parts = {"fixed": fixed_s, "memory": memory_s, "compute": compute_s, "communication": comm_s, "host": host_s}
    step = fixed_s + max(memory_s, compute_s) + comm_s + host_s
    return {"step_s": step, "parts_s": parts, "bytes_per_gpu_gb": gpu_bytes / 1e9, "experts_hit_per_layer": hit,
            "kv_gb_per_gpu": kv / 1e9}


def prefill_s_per_token(profile: ModelProfile, hw: HardwareSpec, plan: Plan, params: EngineParams,
                        prompt: int, prefix_hit: float) -> float:
    """Return the replica's time per new prompt token (chunked prefill, prompts of `prompt` tokens)."""
    g = plan.replica_gpus
    bandwidth, peak = _device(hw)
    # A new token attends to the cached prefix and to the earlier new tokens: on average to the midpoint.
    attended = prompt * (1 + prefix_hit) / 2
    routed_flops = 2.0 * profile.routed_active_params
    matmul = profile.matmul_flops_per_token - (routed_flops if plan.offload else 0.0)
    attention = profile.attention_prefill_flops_per_context * attended
    compute = (matmul / params.mfu + attention / _attention_efficiency(params)) / (g * peak)
    on_gpu = profile.weight_gb - (profile.routed_gb if plan.offload else 0.0)
    weights = on_gpu * 1e9 / (g * bandwidth * params.bw_efficiency) / PREFILL_CHUNK_TOKENS
    host = 0.0
    if plan.offload:
        host = routed_flops / _host(hw)[1]
    return compute + weights + _comm_s_per_token(profile, hw, plan) + host


def _round(profile, hw, plan, params, workload: Workload, batch: int, kv_per_token: float) -> dict:
    """Return the figures of one round in which `batch` users of one replica each complete one request."""
    new_tokens = workload.input_tokens * (1 - workload.prefix_hit)
    t_prefill = prefill_s_per_token(profile, hw, plan, params, workload.input_tokens, workload.prefix_hit)
    step = decode_step(profile, hw, plan, params, batch, workload.input_tokens + workload.output_tokens / 2,
                       kv_per_token)
    prefill_s = batch * (new_tokens * t_prefill + params.request_overhead_ms * 1e-3)
    context = workload.input_tokens + workload.output_tokens / 2
    if workload.arrival == "burst" and workload.output_spread == "exponential":
        decode_s = _tail_decode_s(profile, hw, plan, params, batch, context, kv_per_token, workload.output_tokens)
    else:
        decode_s = workload.output_tokens * step["step_s"]
    round_s = prefill_s + decode_s
    own = new_tokens * t_prefill + params.request_overhead_ms * 1e-3
    if workload.arrival == "burst":
        # All prompts arrived together: on average a request waits for half the others' prefills before its
        # first token, and the other half interrupts its answer.
        ttft = prefill_s / 2 + step["step_s"]
        tpot = (decode_s + prefill_s / 2) / workload.output_tokens
    else:
        # A user's answer is interrupted by the other users' prefills; its own comes before the first token,
        # after the prompts that arrived first: an M/D/1 queue whose load is prefill's share of the engine's time.
        load = prefill_s / round_s
        ttft = own + load * own / (2 * (1 - load)) + step["step_s"]
        tpot = (decode_s + (batch - 1) * own) / workload.output_tokens
    return {"round_s": round_s, "prefill_s": prefill_s, "decode_s": decode_s, "tpot_s": tpot, "ttft_s": ttft,
            "step": step, "prefill_s_per_token": t_prefill}


def _tail_decode_s(profile, hw, plan, params, batch: int, context: float, kv_per_token: float, mean_out: int) -> float:
    """Return the decode time of a burst whose answer lengths are exponential around `mean_out`.

    After s steps batch x exp(-s/m) sequences are still decoding; the time is the integral of the step time over
    s, which with x = batch x exp(-s/m) is m x integral of step(x)/x dx from half a sequence to the batch.
    """
    if batch < 1:
        return 0.0
    lo, hi, n = 0.5, float(batch), 24
    xs = [lo * (hi / lo) ** (i / n) for i in range(n + 1)]
    total = 0.0
    for a, b in zip(xs, xs[1:]):  # trapezoids in log x: integral of step(x)/x dx = integral of step d(ln x)
        sa = decode_step(profile, hw, plan, params, max(1, round(a)), context, kv_per_token)["step_s"]
        sb = decode_step(profile, hw, plan, params, max(1, round(b)), context, kv_per_token)["step_s"]
        total += (sa + sb) / 2 * math.log(b / a)
    return mean_out * total


def _bound_of(r: dict) -> str:
    """Return what limits a round: prefill compute, or the largest part of the decode step."""
    if r["prefill_s"] > r["decode_s"]:
        return "prefill"
    parts = dict(r["step"]["parts_s"])
    return max(parts, key=parts.get)


def predict(profile: ModelProfile, hw: HardwareSpec, plan: Plan, engine: str, params: EngineParams,
            workload: Workload, tight_memory: bool = True) -> dict:
    """Return the deployment's predicted figures for `workload`, with the bound and the uncertainty.

    tight_memory: plan the engine at TIGHT_MEMORY_FRACTION when the usual fraction holds too few sequences
    (what an operator would set); off for a published run, which used the engines' defaults.
    """
    kv_per_token = profile.kv_bytes_per_token_builtin if engine == "builtin" else profile.kv_bytes_per_token
    wanted = math.ceil((workload.concurrency or 1) / plan.replicas)
    cap = capacity(profile, hw, plan, workload.context, kv_per_token, wanted if tight_memory else 0)
    base = {"engine": engine, "plan": plan.to_dict(), "hardware": hw.label, "gpus": plan.gpus,
            "boxes": max(1, hw.boxes), "model": profile.name, "dtype": profile.dtype, "workload": workload.to_dict(),
            "kv_capacity_sequences": cap.sequences * plan.replicas, "weights_gb_per_gpu": cap.weights_gb_per_gpu}
    if not cap.fits:
        return {**base, "fits": False, "reason": cap.reason}
    concurrency, note = _concurrency(profile, hw, plan, engine, params, workload, cap, kv_per_token)
    per_replica = math.ceil(concurrency / plan.replicas)
    batch = max(1, min(per_replica, cap.sequences))
    r = _round(profile, hw, plan, params, workload, batch, kv_per_token)
    waiting = max(0, per_replica - batch)
    ttft = r["ttft_s"] + (waiting / batch) * r["round_s"]  # users beyond the cache's room wait for a turn
    output = plan.replicas * batch * workload.output_tokens / r["round_s"]
    total = plan.replicas * batch * workload.context / r["round_s"]
    roof = _round(profile, hw, plan, ROOFLINE, workload, batch, kv_per_token)
    bound_output = plan.replicas * batch * workload.output_tokens / roof["round_s"]
    u, basis = params.uncertainty, params.basis
    if plan.offload:
        # No published offload run is fitted: the host side runs at an assumed HOST_EFFICIENCY.
        u, basis = max(u, 1.0), basis + f"; offloaded experts at an assumed {HOST_EFFICIENCY:.0%} of the host's peak, not fitted: ±100%"
    notes = [note] if note else []
    if cap.memory_fraction > MEMORY_FRACTION:
        notes.append(f"fits only with the engine allowed {cap.memory_fraction:.0%} of each GPU's memory "
                     f"(vLLM --gpu-memory-utilization, SGLang --mem-fraction-static)")
    boxes = max(1, hw.boxes)
    out = {
        **base, "fits": True, "concurrency": concurrency, "batch_per_replica": batch,
        "output_tokens_per_s": output, "total_tokens_per_s": total,
        "output_tokens_per_s_per_box": output / boxes, "output_tokens_per_s_per_gpu": output / max(1, plan.gpus),
        "output_tokens_per_s_per_user": workload.output_tokens / (r["tpot_s"] * workload.output_tokens + ttft),
        "tpot_ms": r["tpot_s"] * 1e3, "ttft_ms": ttft * 1e3, "bound": _bound_of(r),
        "bound_output_tokens_per_s": bound_output,
        "decode_step_ms": {k: v * 1e3 for k, v in r["step"]["parts_s"].items()},
        "decode_bytes_per_gpu_gb": r["step"]["bytes_per_gpu_gb"], "experts_hit_per_layer": r["step"]["experts_hit_per_layer"],
        "uncertainty": {"relative": u, "output_tokens_per_s_low": output / (1 + u), "output_tokens_per_s_high": output * (1 + u),
                        "basis": basis},
        "params": params.to_dict(),
    }
    if notes:
        out["note"] = "; ".join(notes)
    return out


def _concurrency(profile, hw, plan, engine, params, workload: Workload, cap: Capacity, kv_per_token: float):
    """Return the users in flight: as stated, or what a request rate keeps in flight (Little's law)."""
    if workload.rate_per_s is None:
        return workload.concurrency or 1, ""
    most = cap.sequences * plan.replicas
    users = 1.0
    for _ in range(100):  # latency grows with users; the fixed point is the steady state
        batch = max(1, min(math.ceil(users / plan.replicas), cap.sequences))
        r = _round(profile, hw, plan, params, workload, batch, kv_per_token)
        latency = r["ttft_s"] + r["tpot_s"] * workload.output_tokens
        nxt = workload.rate_per_s * latency
        if abs(nxt - users) < 0.01 or nxt > most:
            users = nxt
            break
        users = 0.5 * users + 0.5 * nxt
    if users > most:
        full = _round(profile, hw, plan, params, workload, cap.sequences, kv_per_token)
        served = plan.replicas * cap.sequences / full["round_s"]
        return most, (f"{workload.rate_per_s:g} requests/s is more than this plan serves ({served:.2f}/s with "
                      f"{most} sequences in flight): the queue grows without bound")
    return max(1, math.ceil(users)), f"{workload.rate_per_s:g} requests/s keep about {users:.1f} requests in flight"
