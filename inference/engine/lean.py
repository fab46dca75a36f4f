"""A lean forward for Llama-family dense decoders (Llama, Qwen2) in plain batched steps on CPU.

On a few-MB model a decode step is bound by per-op overhead, not arithmetic: transformers' forward wraps
every module call in hooks, decorators and output capturing, builds a causal mask the engine's attention
never reads, normalizes every position where only each request's last one is sampled, and dispatches norms
through the hub-kernel layer. This forward makes the same tensor operations, in the same order, on the same
modules' weights (so its logits equal transformers' bit for bit, which a test pins), and nothing else: the
embedding, the rotary table once per step, per layer the two norms, the projections (each module's own
call: plain, packed bf16 or int8 weight-only alike), rotary, the step's cache, the engine's per-request
attention, and the head on the kept rows only. Modules are called as modules, so their hooks still run (the
tests' fault injection, anyone's probes). Models it does not recognise keep transformers' forward, and so
does exact mode (its patches split transformers' products per request).
"""

from __future__ import annotations

import torch
from torch import nn

from inference.engine.attention import rows_attention

# The architectures whose decoder layer is exactly: RMSNorm, attention (q/k/v/o projections, rotary, no
# sliding window), residual, RMSNorm, gated MLP, residual.
LEAN_MODEL_TYPES = frozenset({"llama", "qwen2"})


def _rms_norm(norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm/Qwen2RMSNorm's arithmetic, op for op (float32 inside, back to the input's dtype)."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * hidden.to(dtype)


def _rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb's arithmetic for one tensor [1, h, N, d] with cos/sin [1, 1, N, d]."""
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return (states * cos) + (rotated * sin)


def lean_decoder(model: nn.Module) -> LeanDecoder | None:
    """Return a lean forward for `model`, or None where it keeps transformers' forward (another architecture,
    a sliding-window layer, another activation, weights off the CPU)."""
    config = model.config
    if config.model_type not in LEAN_MODEL_TYPES or getattr(config, "hidden_act", None) != "silu":
        return None
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return None
    if any(p.device.type != "cpu" for p in model.parameters()):
        return None
    return LeanDecoder(model)


class LeanDecoder:
    """The step forward of one Llama-family model: flat batch in, next-token logits of the kept rows out."""

    def __init__(self, model: nn.Module) -> None:
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.layers = list(inner.layers[: model.config.num_hidden_layers])
        self.norm = inner.norm
        self.head = model.lm_head

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache, keep: torch.Tensor) -> torch.Tensor:
        """input_ids, position_ids [1, N]; the step's BatchCache; keep [R] rows to sample: logits [R, V]."""
        n = input_ids.shape[1]
        hidden = self.embed(input_ids)  # [1, N, H]
        cos, sin = self.rotary(hidden, position_ids)  # [1, N, d]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [1, 1, N, d]
        for index, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = _rms_norm(layer.input_layernorm, hidden)
            q = attn.q_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)  # [1, h, N, d]
            k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)  # [1, h_kv, N, d]
            v = attn.v_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            k, v = cache.update(k, v, index)
            out, _ = rows_attention(attn, q, k, v, None, scaling=attn.scaling)  # [1, N, h, d]
            hidden = hidden + attn.o_proj(out.reshape(1, n, -1))
            x = _rms_norm(layer.post_attention_layernorm, hidden)
            hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        last = _rms_norm(self.norm, hidden[:, keep])  # [1, R, H]: the norm works row by row
        return self.head(last)[0]  # [R, V]
