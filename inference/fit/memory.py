"""Predict weight and KV-cache bytes from the meta-built model, at the dtypes a box could use."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from .accounting import Accounting

GB = 1e9
# Bytes per stored element of each plannable weight format, and the scale overhead each format carries:
# fp8 as DeepSeek ships it (one fp32 scale per 128x128 block, quantization_config.weight_block_size),
# int8 with one bf16 scale per output row (per-channel, as in LLM.int8/bitsandbytes),
# int4 as GPTQ/AWQ store it (group size 128: a bf16 scale and a packed zero point per group, ~4 bytes).
DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float8": "fp8", "float8_e4m3fn": "fp8"}
PLANNED_DTYPES = ("stored", "bfloat16", "fp8", "int8", "int4")
# Components whose matrices quantizers convert; embeddings, norms, routers and the head stay in 16 bits.
QUANTIZED_COMPONENTS = frozenset({"attention", "dense_mlp", "routed_experts", "shared_experts"})


def normalise_dtype(name: str) -> str:
    """Return the canonical name of a weight dtype ('bf16' -> 'bfloat16'), or raise ValueError."""
    key = str(name).lower().replace("torch.", "")
    key = DTYPE_ALIASES.get(key, key)
    if key != "stored" and key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; choose from stored, {', '.join(DTYPE_BYTES)}")
    return key


@dataclass(frozen=True)
class WeightBytes:
    """Predicted weight memory at one dtype, split by component."""

    dtype: str
    by_component: dict[str, float]

    @property
    def total(self) -> float:
        """Return all weight bytes, buffers included."""
        return sum(self.by_component.values())


def _scale_overhead(fmt: str, numel: int, rows: int, block: tuple[int, int]) -> float:
    """Return the bytes of quantization scales stored next to `numel` weights in format `fmt`."""
    if fmt == "fp8":
        return numel / (block[0] * block[1]) * 4  # one fp32 scale_inv per block
    if fmt == "int8":
        return rows * 2
    if fmt == "int4":
        return numel / 128 * 4
    return 0.0


def weight_bytes(acc: Accounting, dtype: str, quantization: dict | None = None,
                 stored_dtype: str = "bfloat16") -> WeightBytes:
    """Return the bytes the weights take at `dtype` ('stored' reads the checkpoint's quantization_config)."""
    dtype = normalise_dtype(dtype)
    fmt, dense = dtype, dtype
    block = (128, 128)
    if dtype == "stored":
        dense = normalise_dtype(stored_dtype)
        fmt = _stored_format(quantization) or dense
        if quantization and quantization.get("weight_block_size"):
            block = tuple(quantization["weight_block_size"])
    if fmt in ("fp8", "int8", "int4") and dtype != "stored":
        dense = "bfloat16"  # what quantizers leave unconverted stays in bf16
    out: dict[str, float] = {}
    for t in acc.tensors:
        # Tensors transformers keeps in fp32 whatever the load dtype (DeepSeek's router weight and its
        # e_score_correction_bias, `_keep_in_fp32_modules_strict`) were built in fp32 on the meta device.
        kept_fp32 = t.dtype == torch.float32 and acc.build_dtype != torch.float32
        if kept_fp32:
            size = t.numel * 4.0
        elif t.is_parameter and t.component in QUANTIZED_COMPONENTS and fmt in ("fp8", "int8", "int4"):
            rows = t.numel // max(1, acc.hidden_size)
            size = t.numel * DTYPE_BYTES[fmt] + _scale_overhead(fmt, t.numel, rows, block)
        else:
            size = t.numel * DTYPE_BYTES[dense] if t.dtype.is_floating_point else t.numel * t.dtype.itemsize
        key = t.component if t.is_parameter else "buffers"
        out[key] = out.get(key, 0.0) + size
    return WeightBytes(dtype if dtype != "stored" else f"stored ({fmt})", out)


def _stored_format(quantization: dict | None) -> str | None:
    """Return the weight format a quantization_config declares, or None for an unquantized checkpoint."""
    if not quantization:
        return None
    method = str(quantization.get("quant_method", "")).lower()
    bits = quantization.get("bits") or quantization.get("w_bit")
    if method == "fp8":
        return "fp8"
    if bits == 4 or method in ("awq", "gptq") and bits in (None, 4):
        return "int4"
    if bits == 8 or method in ("bitsandbytes_8bit",):
        return "int8"
    return None


def allocated_bytes(acc: Accounting) -> int:
    """Return the exact bytes transformers allocates for this build's parameters and buffers."""
    return sum(t.numel * t.dtype.itemsize for t in acc.tensors)


@dataclass(frozen=True)
class KvLayout:
    """KV-cache elements per token: as the engine stores them and as the architecture could."""

    engine_elements: int  # summed over layers, read from a DynamicCache after a meta forward
    per_head_elements: int  # full per-head K and V (what a naive MLA implementation caches)
    latent_elements: int  # the smallest cache the architecture allows (MLA latent; K/V heads otherwise)
    layout: str  # "mla-latent", "mla-per-head" or "kv-heads"

    def bytes_per_token(self, dtype_bytes: float = 2.0) -> dict[str, float]:
        """Return bytes per token of context for the three layouts at `dtype_bytes` per element."""
        return {"engine": self.engine_elements * dtype_bytes, "per_head": self.per_head_elements * dtype_bytes,
                "latent": self.latent_elements * dtype_bytes}


def kv_layout(model: PreTrainedModel) -> KvLayout:
    """Return the KV layout of `model`, probing what its attention writes into a transformers cache."""
    config = model.config
    layers = config.num_hidden_layers
    if hasattr(config, "kv_lora_rank"):
        heads = config.num_attention_heads
        per_head = layers * heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
        latent = layers * (config.kv_lora_rank + config.qk_rope_head_dim)
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        per_head = latent = layers * 2 * kv_heads * head_dim
    engine = probe_cache_elements(model)
    layout = "kv-heads" if per_head == latent else ("mla-latent" if engine == latent else "mla-per-head")
    return KvLayout(engine, per_head, latent, layout)


def probe_cache_elements(model: PreTrainedModel, tokens: int = 2) -> int:
    """Return cache elements per token, found by running each attention layer on meta tensors."""
    # Run the real attention modules rather than restating their formulas, so a transformers release
    # that changes what it caches (DeepSeek-V3 moved from per-head K/V to the MLA latent) is followed.
    config = model.config
    cache = DynamicCache(config=config)
    hidden = torch.empty(1, tokens, config.hidden_size, device="meta", dtype=model.dtype)
    positions = torch.arange(tokens, device="meta")[None]
    rotary = getattr(model.model, "rotary_emb", None)
    embeddings = rotary(hidden, positions) if rotary is not None else None
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn(hidden, position_embeddings=embeddings, attention_mask=None, cache=cache)
    total = 0
    for entry in cache.layers:
        for tensor in (getattr(entry, "keys", None), getattr(entry, "values", None)):
            if tensor is not None and tensor.numel():
                total += tensor.numel() // tokens
    return total
