"""Weight precision: which number format a deployment's weights are held in, and int8 weight-only layers.

A decode step on CPU is bound by the bytes of weights it reads, so halving them (bfloat16) or quartering
them (int8) is the largest single lever there, but only where the CPU has kernels that compute in that
format: bfloat16 products are native with AVX512-BF16 or AMX (oneDNN runs them), and emulated, slower
than float32, elsewhere. int8 weight-only multiplies bfloat16 activations by int8 weights with
per-output-channel scales through torch's own CPU kernel (`aten._weight_int8pack_mm`), as gpt-fast does;
routed MoE experts (3-D weights) get the same treatment one expert at a time.

That kernel is fast only with bfloat16 activations, on AVX2 as on AVX512 (measured on a 2-core AVX2 EPYC,
one thread, a 1024x8192 layer: 0.8 ms for one row against float32's 2.5 ms, 3.6 against 10.2 for 8 rows; with
float32 activations 9.5 and 148 ms), and it slows per row beyond 16 rows (32 rows 22.7 ms, 16 rows 7.8), so
an int8 layer converts its input to bfloat16 and back whatever the model's dtype, and takes at most
INT8_ROWS_PER_CALL rows per call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from inference.engine.config import PRECISIONS

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """Return True when oneDNN runs bfloat16 products natively on this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# Below this many bytes of weight files a model stays in float32 under "auto". The few-MB demos are bound by per-op
# overhead, and bf16's conversions make them slower (bench/step_profile.py, one thread, a 2-core AVX512-BF16 EPYC:
# demo-dense decodes one request in 1.6 ms a step in bf16 against 0.9 in float32). With packed weights the real
# SmolLM2-135M (257 MiB of bf16 files) decodes twice as fast in bf16 (36 against 68 ms a step for one request, 55
# against 98 for 8), but its greedy answers then depend on how each product is split (the batch's rows, a prefix-cache
# chunk, the thread count) and do not reliably equal unbatched `generate`, which float32's do on that model; so the
# bundled model stays float32 by default, and APPLIANCE_ENGINE_PRECISION=bfloat16 buys the speed. Models of 0.5B
# parameters and more, whose float32 steps are bound by reading the weights, take bf16.
BF16_PAYS_FROM_BYTES = 512 * 2**20


def resolve_precision(precision: str, device: str, *, exact: bool, weight_file_bytes: int | None = None) -> str:
    """Return the precision a deployment runs in: "float32", "bfloat16" or "int8".

    "auto" on a GPU is bfloat16 (its native matmul type). On CPU it is bfloat16 where the CPU computes it
    natively (AVX512-BF16/AMX) and the model is not tiny (`weight_file_bytes`, the size of its weight files,
    at least BF16_PAYS_FROM_BYTES; unknown counts as not tiny), else float32. Exact batching is defined
    against unbatched float32 generate on CPU, so "auto" keeps float32 there when exact mode is on.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "int8" and device != "cpu":
        raise ValueError("precision int8 uses torch's CPU kernels; on a GPU use bfloat16 or float32")
    if precision == "int8" and exact:
        raise ValueError("precision int8 cannot run in exact mode (its products are not split per request)")
    if precision != "auto":
        return precision
    if device != "cpu":
        return "bfloat16"
    if exact:
        return "float32"
    if weight_file_bytes is not None and weight_file_bytes < BF16_PAYS_FROM_BYTES:
        return "float32"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def load_dtype(precision: str) -> torch.dtype:
    """Return the dtype weights are loaded in: with int8, what stays unquantized (embeddings, the head,
    norms) is bfloat16 where the CPU computes it natively, else float32."""
    if precision == "int8":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return _DTYPES[precision]


# The int8 kernel's activation and scale dtype (see the module's docstring), and the most rows it takes at once.
INT8_COMPUTE_DTYPE = torch.bfloat16
INT8_ROWS_PER_CALL = 16


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return int8 weights [O, K] and one bfloat16 scale per output row [O], symmetric."""
    w = weight.detach().float()
    # Rounded to the stored dtype first, so the int8 steps are those of the scale the kernel multiplies by.
    scales = (w.abs().amax(dim=-1).clamp(min=1e-8) / 127.0).to(INT8_COMPUTE_DTYPE)
    q = torch.round(w / scales.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] times int8 weight [O, K] with per-row scales [O], computed in bfloat16: [..., O] in x's dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(scales.dtype).contiguous()
    if flat.shape[0] == 0:  # an expert no token was routed to in a batched call
        return x.new_zeros((*x.shape[:-1], weight.shape[0]))
    parts = [torch.ops.aten._weight_int8pack_mm(rows, weight, scales) for rows in flat.split(INT8_ROWS_PER_CALL)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class Int8WeightOnlyLinear(nn.Module):
    """A Linear whose weight is int8 with one scale per output channel; bias and activations unchanged."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = _quantize_rows(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_linear(x, self.weight, self.scales)
        return out if self.bias is None else out + self.bias

    def dequantized_weight(self) -> torch.Tensor:
        """Return the weight [O, K] as the numbers it stands for, in the compute dtype (int8 times its row scale)."""
        return (self.weight.float() * self.scales.float().unsqueeze(-1)).to(self.scales.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def _experts_of_common_shape(module: nn.Module) -> bool:
    """transformers' expert collections of the common shape: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        type(module).__name__.endswith("Experts")
        and isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3
        and isinstance(down, nn.Parameter) and down.dim() == 3
        and not getattr(module, "has_bias", False)
        and hasattr(module, "act_fn")
    )


def _quantize_experts(module: nn.Module) -> None:
    """Replace an expert collection's 3-D weights by int8 + scales and its forward by one that uses them."""
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(module, name)
        q, scales = _quantize_rows(weight)  # rows are the last-but-one axis: one scale per expert and channel
        delattr(module, name)
        module.register_buffer(f"{name}_int8", q)
        module.register_buffer(f"{name}_scales", scales)

    def project(x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        return int8_linear(x, getattr(module, f"{name}_int8")[expert], getattr(module, f"{name}_scales")[expert])

    module.forward = _sorted_experts_forward(module, project)


def _sorted_experts_forward(module: nn.Module, project: Callable[[torch.Tensor, str, int], torch.Tensor]):
    """Return an experts forward that sorts tokens by expert once and makes one product per expert hit, with
    `project(x, "gate_up_proj" | "down_proj", expert)` as the product (transformers' own loops over a one-hot
    mask per expert, and its grouped_mm lays the weights out anew every call)."""
    num_experts = module.num_experts

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        flat_experts = top_k_index.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=num_experts).tolist()
        token_of = order // top_k_index.shape[1]
        weight_of = top_k_weights.reshape(-1)[order]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0 or expert >= num_experts:
                start += count
                continue
            rows = token_of[start:start + count]
            gate, up = project(hidden_states[rows], "gate_up_proj", expert).chunk(2, dim=-1)
            h = project(module.act_fn(gate) * up, "down_proj", expert)
            final.index_add_(0, rows, (h * weight_of[start:start + count, None]).to(final.dtype))
            start += count
        return final

    return forward


def quantize_int8_weight_only(model: nn.Module) -> dict:
    """Turn every Linear (the LM head and embeddings excepted) and every routed-expert collection into int8
    weight-only, in place. Return counts of what was converted, for the engine's description."""
    head = model.get_output_embeddings()
    linears = experts = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child is not head:
                setattr(parent, child_name, Int8WeightOnlyLinear(child))
                linears += 1
            elif _experts_of_common_shape(child):
                _quantize_experts(child)
                experts += 1
    # The LM head stays in the compute type: it picks the argmax, where 8 bits would flip the most answers,
    # and with tied embeddings its weight is the embedding table too.
    log.info("int8 weight-only: %d linear layers and %d expert collections converted", linears, experts)
    return {"int8_linear_layers": linears, "int8_expert_collections": experts}


# oneDNN lays a weight out for the row count it is told to expect; 8 was as fast as any hint from 1 to 64
# for 1 to 64 rows (a 1024x4096 layer on a 2-core AMX Xeon, one thread: 0.49 ms for 1-16 rows, 0.70 with hint 1).
PACK_ROWS_HINT = 8


def _pack_bf16_weight(weight: torch.Tensor) -> torch.Tensor:
    """Return a [O, K] bfloat16 weight laid out once in oneDNN's blocked format (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS_HINT)


def packed_bf16_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] times a packed [O, K] bfloat16 weight: [..., O] in x's dtype."""
    out = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, bias, "none", [], "")
    return out.to(x.dtype)


class PackedBf16Linear(nn.Module):
    """A bfloat16 Linear whose weight oneDNN laid out once for its native bf16 kernels (AMX, AVX512-BF16).

    A plain bfloat16 `F.linear` hands oneDNN the weight in PyTorch's layout, and oneDNN re-lays it out on every
    call; packed once at load, every product reads the weight as the kernel wants it. Measured on a 2-core AMX
    Xeon, one thread (plain against packed): an 896x4864 layer 0.97 against 0.56 ms for one row, 0.82 against
    0.59 for 8, 2.1 against 1.4 for 64, 12.0 against 10.1 for a 512-token prefill; a 151936-row LM head 29
    against 19 ms for one row. The packed copy replaces the weight, so memory stays as it was (with tied
    embeddings the embedding keeps its table and the head's packed copy is extra).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", _pack_bf16_weight(linear.weight))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_bf16_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bfloat16 packed for oneDNN"


class _PackedExpertWeights(nn.Module):
    """One expert collection's 3-D weight [E, O, K] as E packed [O, K] weights (buffers "0".."E-1")."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        for expert in range(weight.shape[0]):
            self.register_buffer(str(expert), _pack_bf16_weight(weight[expert]))

    def __getitem__(self, expert: int) -> torch.Tensor:
        return getattr(self, str(expert))


def _pack_experts(module: nn.Module) -> None:
    """Replace an expert collection's 3-D bfloat16 weights by packed ones, one per expert, and its forward by
    the sorted-experts loop over them."""
    for name in ("gate_up_proj", "down_proj"):
        packed = _PackedExpertWeights(getattr(module, name))
        delattr(module, name)
        module.add_module(f"{name}_packed", packed)

    def project(x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        return packed_bf16_linear(x, getattr(module, f"{name}_packed")[expert])

    module.forward = _sorted_experts_forward(module, project)


def pack_bf16_weights(model: nn.Module) -> dict:
    """On a CPU with native bfloat16, lay every bfloat16 Linear (the LM head included; not one flagged
    `keep_unpacked`, whose weight is also read as views) and every bfloat16 routed-expert collection out once for
    oneDNN, in place; elsewhere change nothing. Return counts of what
    was packed. Only for plain batched steps: exact mode splits each linear per request itself."""
    linears = experts = 0
    if not cpu_has_native_bf16():
        return {"packed_linear_layers": 0, "packed_expert_collections": 0}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and _is_cpu_bf16(child.weight) and not getattr(child, "keep_unpacked", False):
                setattr(parent, child_name, PackedBf16Linear(child))
                linears += 1
            elif _experts_of_common_shape(child) and _is_cpu_bf16(child.gate_up_proj) and _is_cpu_bf16(child.down_proj):
                _pack_experts(child)
                experts += 1
    log.info("bfloat16 packed for oneDNN: %d linear layers and %d expert collections", linears, experts)
    return {"packed_linear_layers": linears, "packed_expert_collections": experts}


def _is_cpu_bf16(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16


def weight_bytes(model: nn.Module) -> int:
    """Return the bytes the model's parameters and buffers hold (weights as stored, scales included)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
