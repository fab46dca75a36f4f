"""A model's throughput profile: the bytes and FLOPs one step touches, as plain numbers (no torch to read it).

analyze() writes one profile per planned dtype into the report, so the console can predict throughput for
any workload, box or plan from the stored report without building the model again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class ModelProfile:
    """Everything the throughput model needs to know about one model at one weight dtype."""

    name: str
    dtype: str
    layers: int
    moe_layers: int
    hidden: int
    experts: int  # routed experts per MoE layer (0 for a dense model)
    top_k: int
    weight_gb: float  # all weights at this dtype
    attention_gb: float  # attention weights (replicated on every GPU of a data-parallel attention group)
    routed_gb: float  # routed experts, all layers
    dense_gb: float  # every other matrix a step reads (dense MLP, shared experts, head, router, norms)
    kv_bytes_per_token: float  # as vLLM and SGLang cache it: the MLA latent, or K/V heads, in bf16
    kv_bytes_per_token_builtin: float  # as this appliance's engine caches it
    kv_heads: int  # heads the cache can be split over by tensor parallelism (1 for MLA's shared latent)
    matmul_flops_per_token: float  # 2 x active parameters
    attention_decode_flops_per_context: float  # per generated token, per cached token
    attention_prefill_flops_per_context: float  # per prompt token, per earlier token
    total_params: int
    active_params: int
    routed_active_params: int  # routed-expert parameters one token passes through (k of E per layer)

    @property
    def expert_gb(self) -> float:
        """Return the bytes of one routed expert in one layer, in GB."""
        return self.routed_gb / (self.experts * self.moe_layers) if self.experts and self.moe_layers else 0.0

    def to_dict(self) -> dict:
        """Return the profile as JSON-ready values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelProfile":
        """Return the profile stored by to_dict (extra keys from newer reports are ignored)."""
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"stored profile lacks {', '.join(sorted(missing))}; analyse the variant again")
        return cls(**{k: data[k] for k in names})


def build_profile(name: str, acc, by_component: dict[str, float], dtype: str, config, kv: dict[str, float]) -> ModelProfile:
    """Return the profile of an accounted model whose weights take `by_component` bytes at `dtype`."""
    gb = 1e9
    routed = by_component.get("routed_experts", 0.0)
    attention = by_component.get("attention", 0.0)
    # A decode step reads B rows of the input embedding, not the table: it is not part of the step's bytes.
    embedding = 0.0 if acc.tied_embeddings else by_component.get("embedding", 0.0)
    dense = sum(by_component.values()) - routed - attention - embedding
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    if getattr(config, "kv_lora_rank", None):
        rank, rope = config.kv_lora_rank, config.qk_rope_head_dim
        # Serving engines decode MLA in its absorbed form: each head scores the whole latent (rank + rope)
        # and sums values in the latent (rank); prefill runs the expanded form on per-head K/V.
        decode = 2.0 * layers * heads * (rank + rope + rank)
        prefill = 2.0 * layers * heads * (config.qk_nope_head_dim + rope + config.v_head_dim)
        serving_kv, kv_heads = kv["latent"], 1
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        decode = prefill = 2.0 * layers * heads * 2 * head_dim
        serving_kv = kv["latent"]
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
    moe = acc.moe
    return ModelProfile(
        name=name, dtype=dtype, layers=layers, moe_layers=moe.moe_layers if moe else 0, hidden=config.hidden_size,
        experts=moe.experts if moe else 0, top_k=moe.top_k if moe else 0, weight_gb=sum(by_component.values()) / gb,
        attention_gb=attention / gb, routed_gb=routed / gb, dense_gb=dense / gb, kv_bytes_per_token=serving_kv,
        kv_bytes_per_token_builtin=kv["engine"], kv_heads=int(kv_heads), matmul_flops_per_token=2.0 * acc.active,
        attention_decode_flops_per_context=decode, attention_prefill_flops_per_context=prefill,
        total_params=acc.total, active_params=acc.active, routed_active_params=acc.routed_active)
