"""Bound the model a config.json describes before anything builds it, by arithmetic alone (no torch).

A config is a promise about the weights: num_hidden_layers, hidden_size, vocab_size, intermediate_size and
the expert counts fix the parameter count. Building the model on the meta device to count them takes
minutes and gigabytes for a config of millions of layers, so the count is computed from the figures here,
compared with the largest box the advisor knows and with the weights on disk, and refused when absurd.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .datasheets import NARROWEST_BITS_PER_PARAM, largest_box

# Families whose parameter count this module computes exactly (tests/fit/test_bounds.py checks each against
# the meta-device build); for any other model_type the count is a lower bound (embedding + one norm a layer).
DENSE_GATED = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "gemma", "gemma2"})
MOE = frozenset({"deepseek_v3", "deepseek_v2", "mixtral", "qwen2_moe", "qwen3_moe"})
EXACT_FAMILIES = DENSE_GATED | MOE
# How far the weights' own count may stray from the config's: scales of fp8 blocks, biases and norms the
# formulas leave out are far below this; a lying figure (twice the layers, experts or width) is far above.
TOLERANCE = 0.05
# A quantized checkpoint packs several weights into one stored element (int4 in int32: 8; 2-bit: 16).
MAX_PACKING = 16
# The narrowest a weight is stored without a quantization_config (fp8/int8 checkpoints), and with one (2 bits).
MIN_STORED_BITS = 8
MIN_QUANTIZED_BITS = 2


class ModelOutOfBounds(ValueError):
    """A config whose implied model is absurd or disagrees with its weights; the message names the figure."""


@dataclass(frozen=True)
class Implied:
    """What a config implies: its parameter count (exact for known families) and the figures behind it."""

    total: int
    exact: bool
    layers: int
    extra_layers: int  # modules a checkpoint may store past num_hidden_layers (DeepSeek's MTP layers)
    optional: int  # parameters of those modules, which checkpoints saved by transformers leave out
    hidden: int
    vocab: int
    quantized: bool
    figures: dict

    def describe(self) -> str:
        """Return the figures that make the count, as `key=value` pairs."""
        return ", ".join(f"{k}={figure(v)}" for k, v in self.figures.items())


def figure(n: int) -> str:
    """Return a count with thousands separators, or its order of magnitude when too long to print."""
    # Python refuses to print integers of more than 4,300 digits; a lying config can imply one.
    return f"{n:,}" if n < 10**30 else f"about 10^{int(n.bit_length() * 0.30103)}"


def text_config(config: dict) -> dict:
    """Return the language model's part of a config (multimodal configs nest it under text_config)."""
    inner = config.get("text_config")
    if isinstance(inner, dict) and "hidden_size" not in config:
        return {**config, **inner}
    return config


class _Figures:
    """Read whole-number figures from a config, remembering each one used, refusing any that is not one."""

    def __init__(self, config: dict, source: str):
        self.config, self.source, self.used = config, source, {}

    def get(self, *keys: str, default: int | None = None) -> int | None:
        """Return the first of keys present (not null) as a non-negative int, else default."""
        for key in keys:
            value = self.config.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ModelOutOfBounds(f"{self.source}: {key} must be a whole number of at least 0, got {value!r}")
            self.used[key] = value
            return value
        return default

    def need(self, *keys: str) -> int:
        """Return the first of keys present, or refuse naming them."""
        value = self.get(*keys)
        if value is None:
            raise ModelOutOfBounds(f"{self.source} has no {' / '.join(keys)}")
        return value


def implied_parameters(config: dict, source: str = "config.json") -> Implied:
    """Return the parameter count a config implies, as stored in its checkpoint."""
    cfg = text_config(config)
    model_type = str(cfg.get("model_type", ""))
    f = _Figures(cfg, source)
    layers = f.need("num_hidden_layers", "n_layer", "num_layers")
    hidden = f.need("hidden_size", "n_embd", "d_model")
    vocab = f.need("vocab_size")
    tied = bool(cfg.get("tie_word_embeddings", model_type.startswith("gemma")))
    embed = vocab * hidden * (1 if tied else 2)
    quantized = isinstance(cfg.get("quantization_config"), dict)
    extra = f.get("num_nextn_predict_layers", default=0) if model_type.startswith("deepseek_v3") else 0
    if model_type not in EXACT_FAMILIES:
        total = embed + layers * hidden
        return Implied(total, False, layers, 0, 0, hidden, vocab, quantized, dict(f.used))
    # Gemma 2 norms each layer four times (before and after attention and MLP), the others twice.
    norms = (4 if model_type == "gemma2" else 2) * hidden
    attention = _attention(f, model_type, hidden)
    moe_layers, last_is_moe = _moe_layers(f, model_type, layers)
    dense = attention + norms + (_mlp(f, model_type, hidden, False) if moe_layers < layers else 0)
    sparse = attention + norms + (_mlp(f, model_type, hidden, True) if moe_layers else 0)
    # DeepSeek-V3's README_WEIGHTS.md: each MTP module is a decoder layer shaped like the last one, plus
    # enorm, hnorm, eh_proj (2H -> H), shared_head.norm, and its own copies of embedding and head.
    last = sparse if last_is_moe else dense
    optional = extra * (last + 2 * hidden * hidden + 3 * hidden + 2 * vocab * hidden) if layers else 0
    total = embed + hidden + (layers - moe_layers) * dense + moe_layers * sparse + optional
    return Implied(total, True, layers, extra, optional, hidden, vocab, quantized, dict(f.used))


def _moe_layers(f: _Figures, model_type: str, layers: int) -> tuple[int, bool]:
    """Return how many decoder layers have a mixture-of-experts MLP and whether the last one does.

    Counted arithmetically, never layer by layer: the config may claim a billion layers.
    """
    if model_type in DENSE_GATED or not layers:
        return 0, False
    if model_type == "mixtral":
        return layers, True
    if model_type.startswith("deepseek"):
        first = min(f.get("first_k_dense_replace", default=0), layers)
        freq = f.get("moe_layer_freq", default=1) or 1
        # Layers i >= first with i % freq == 0.
        count = (layers - 1) // freq - (first - 1) // freq if first else (layers - 1) // freq + 1
        return count, layers - 1 >= first and (layers - 1) % freq == 0
    if not f.get("num_experts", "num_local_experts", default=0):
        return 0, False
    step = f.get("decoder_sparse_step", default=1) or 1
    listed = f.config.get("mlp_only_layers")
    dense_only = {i for i in listed if isinstance(i, int)} if isinstance(listed, list) else set()
    # transformers' rule: layer i is sparse when (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers.
    listed_sparse = sum(1 for i in dense_only if 0 <= i < layers and (i + 1) % step == 0)
    return layers // step - listed_sparse, layers - 1 not in dense_only and layers % step == 0


def _attention(f: _Figures, model_type: str, hidden: int) -> int:
    """Return one layer's attention parameters: MLA (DeepSeek) or grouped-query attention."""
    heads = f.need("num_attention_heads", "n_head")
    if f.config.get("kv_lora_rank") is not None:
        q_rank, kv_rank = f.get("q_lora_rank"), f.need("kv_lora_rank")
        nope, rope, v_dim = f.need("qk_nope_head_dim"), f.need("qk_rope_head_dim"), f.need("v_head_dim")
        q_out = heads * (nope + rope)
        q = hidden * q_rank + q_rank + q_rank * q_out if q_rank else hidden * q_out
        return q + hidden * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v_dim) + heads * v_dim * hidden
    kv_heads = f.get("num_key_value_heads", default=heads)
    head_dim = f.get("head_dim") or (hidden // heads if heads else 0)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    params = 2 * hidden * q_dim + 2 * hidden * kv_dim
    if model_type in ("qwen2", "qwen2_moe"):
        params += q_dim + 2 * kv_dim  # Qwen2 always biases q, k and v
    elif f.config.get("attention_bias"):
        params += q_dim + 2 * kv_dim + hidden
    if model_type.startswith("qwen3"):
        params += 2 * head_dim  # q_norm and k_norm
    return params


def _mlp(f: _Figures, model_type: str, hidden: int, moe: bool) -> int:
    """Return one layer's MLP parameters: a gated MLP, or routed + shared experts and their router."""
    if not moe:
        inner = f.need("intermediate_size", "n_inner", "ffn_dim")
        return 3 * hidden * inner + (2 * inner + hidden if f.config.get("mlp_bias") else 0)
    if model_type == "mixtral":
        experts, inner = f.need("num_local_experts", "num_experts"), f.need("intermediate_size")
        return experts * 3 * hidden * inner + experts * hidden
    experts = f.need("n_routed_experts", "num_experts", "num_local_experts")
    inner = f.need("moe_intermediate_size")
    params = experts * 3 * hidden * inner + experts * hidden
    if model_type.startswith("deepseek"):
        params += f.get("n_shared_experts", default=0) * 3 * hidden * inner
    elif model_type == "qwen2_moe":
        params += 3 * hidden * f.need("shared_expert_intermediate_size") + hidden  # shared expert and its gate
    return params


def check_buildable(config: dict, source: str = "config.json") -> Implied:
    """Return what a config implies, or refuse one that no box the advisor knows could hold at 4 bits."""
    implied = implied_parameters(config, source)
    label, capacity_gb = largest_box()
    need_bytes = implied.total * NARROWEST_BITS_PER_PARAM // 8  # integers: the count may not fit a float
    if need_bytes > int(capacity_gb * 1e9):
        raise ModelOutOfBounds(
            f"{source} implies {figure(implied.total)} parameters ({implied.describe()}): "
            f"{figure(need_bytes // 10**9)} GB even at 4 bits, more than the largest box the advisor knows "
            f"({label}, {capacity_gb:,.0f} GB)")
    return implied


def check_weight_bytes(config: dict, weight_bytes: int, source: str = "config.json") -> Implied:
    """Refuse a config that implies more parameters than the weight files' size can hold (sizes only)."""
    implied = check_buildable(config, source)
    need = implied.total * (MIN_QUANTIZED_BITS if implied.quantized else MIN_STORED_BITS) // 8
    if need > weight_bytes * (1 + TOLERANCE):
        raise ModelOutOfBounds(
            f"{source} implies {figure(implied.total)} parameters ({implied.describe()}), "
            f"at least {need / 1e9:,.1f} GB of weights, but the *.safetensors files hold {weight_bytes / 1e9:,.3f} GB")
    return implied


def check_model_dir(path: Path, config: dict) -> Implied:
    """Refuse a model directory whose config implies more than its weight files can hold (no header reads)."""
    weight_bytes = sum(p.stat().st_size for p in path.rglob("*.safetensors") if p.is_file())
    return check_weight_bytes(config, weight_bytes, f"{path.name}/config.json")
