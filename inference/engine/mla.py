"""Multi-head latent attention (DeepSeek-V3) for plain batched steps: short queries attend to the cached
latents with kv_b_proj absorbed, instead of expanding every cached latent at every step.

transformers' DeepseekV3Attention caches each token's latent (kv_lora_rank + rope dims: 576 numbers a layer on
DeepSeek-V3) and, at every step, expands the whole history through kv_b_proj [H*(nope+v), kv_lora_rank] into
per-head keys and values. A decode step then costs 2*L*kv_lora*H*(nope+v) multiply-adds per request and layer
for L cached tokens, growing with the context, to attend with one query. Absorbing the projection, as
DeepSeek's own inference code and vLLM's MLA decode do:

    score  = q_nope . (W_UK c) + q_rot . k_rot = (W_UK^T q_nope) . c + q_rot . k_rot
    output = sum_j p_j (W_UV c_j)             = W_UV (sum_j p_j c_j)

so every head attends to the latents themselves, one key/value head shared by all (MQA over kv_lora + rope
dims), and W_UK, W_UV are applied to the T queries and outputs only. That costs 2*H*T*L*(2*kv_lora + rope)
against expanding's 2*L*kv_lora*H*(nope+v) + 2*H*T*L*(qk + v): absorbing is cheaper for chunks shorter than
`absorb_below` tokens (170 on DeepSeek-V3's ranks), so decodes and short chunks absorb and long prompt chunks
expand their history as transformers does. Only in plain mode: exact mode keeps transformers' forward, whose
products are the ones unbatched `generate` makes.

The cache keeps one tensor per token and layer, the latent and the rotated rope key side by side
([1, 1, L, kv_lora + rope] as the store's keys, an empty value tensor), so the step reads each request's
history as a view, with no concatenation.
"""

from __future__ import annotations

import sys
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from inference.engine.attention import causal_mask, chunk_mask
from inference.engine.exact import current_layout


def install_absorbed_mla(model: nn.Module) -> int:
    """Give every DeepSeek-V3 attention module of `model` the absorbed forward; return how many got it."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == "DeepseekV3Attention":
            _install(module)
            count += 1
    return count


def _install(module: nn.Module) -> None:
    heads, nope, v_dim, rank = module.num_heads, module.qk_nope_head_dim, module.v_head_dim, module.kv_lora_rank
    rope = module.qk_rope_head_dim
    if isinstance(module.kv_b_proj, nn.Linear):
        # W_UK and W_UV are read as views of kv_b_proj's own weight at each step (no second copy), so that weight
        # stays in PyTorch's layout: precision.pack_bf16_weights leaves a layer with this flag as it is.
        module.kv_b_proj.keep_unpacked = True
    else:  # int8 weight-only (precision.Int8WeightOnlyLinear): a dequantized copy, since views need numbers
        weight = module.kv_b_proj.dequantized_weight().view(heads, nope + v_dim, rank)
        module.register_buffer("absorbed_weight", weight, persistent=False)
    # Absorbing costs 2HTL(2r + rope) against expanding's 2Lr·H(nope + v) + 2HTL(nope + rope + v): solve for T.
    module.absorb_below = rank * (nope + v_dim) / max(1, 2 * rank + rope - (nope + rope + v_dim))
    modeling = sys.modules[type(module).__module__]
    module.rotate = (modeling.apply_rotary_pos_emb_interleave if module.config.rope_interleave
                     else modeling.apply_rotary_pos_emb)
    module.stock_forward = module.forward
    module.forward = MethodType(_forward, module)


def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
    """Return W_UK [H, nope, r] and W_UV transposed [H, r, v]: views of kv_b_proj's weight [H*(nope + v), r]."""
    weight = getattr(self, "absorbed_weight", None)
    if weight is None:
        weight = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
    return weight[:, : self.qk_nope_head_dim], weight[:, self.qk_nope_head_dim :].transpose(1, 2)


def _forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
             attention_mask: torch.Tensor | None = None, cache=None, **kwargs):
    """DeepseekV3Attention.forward over the engine's flat batch [1, N, hidden]; [1, N, hidden] and no weights."""
    layout = current_layout()
    if layout is None or cache is None or hidden_states.shape[0] != 1:  # outside an engine step
        return self.stock_forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
    n = hidden_states.shape[1]
    heads, nope, rope, rank = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
    if self.q_lora_rank is None:
        q = self.q_proj(hidden_states)
    else:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    q = q.view(1, n, heads, nope + rope).transpose(1, 2)  # [1, H, N, qk]
    q_nope, q_rot = q.split([nope, rope], dim=-1)
    latent, k_rot = self.kv_a_proj_with_mqa(hidden_states).split([rank, rope], dim=-1)  # [1, N, r], [1, N, rope]
    latent = self.kv_a_layernorm(latent)
    cos, sin = position_embeddings
    q_rot, k_rot = self.rotate(q_rot, k_rot.view(1, 1, n, rope), cos, sin)
    cache.update(torch.cat([latent.view(1, 1, n, rank), k_rot], dim=-1), latent.new_empty(1, 1, n, 0), self.layer_idx)
    histories = [keys[0, 0] for keys, _ in layout.cache.history(self.layer_idx)]  # [L_i, r + rope] views

    lengths = layout.token_lengths
    if max(lengths) < self.absorb_below:  # the usual decode step: every request absorbs, products batched
        out = _absorbed(self, q_nope[0], q_rot[0], histories, lengths)
    else:
        parts = []
        for q_n, q_r, history in zip(q_nope[0].split(lengths, 1), q_rot[0].split(lengths, 1), histories):
            if q_n.shape[1] < self.absorb_below:
                parts.append(_absorbed(self, q_n, q_r, [history], [q_n.shape[1]]))
            else:
                parts.append(_expanded(self, q_n, q_r, history))
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
    return self.o_proj(out[None]), None  # [1, N, hidden]


def _absorbed(self, q_nope: torch.Tensor, q_rot: torch.Tensor, histories: list[torch.Tensor],
              lengths: list[int]) -> torch.Tensor:
    """Attend queries q_nope [H, T, nope], q_rot [H, T, rope] of requests with `lengths` tokens each to their
    latent histories [L_i, r + rope]; return [T, H*v]."""
    heads, rank = self.num_heads, self.kv_lora_rank
    w_uk, w_uv_t = _absorbed_weights(self)
    # [H, T, r + rope], the softmax scale folded in once.
    query = torch.cat([torch.bmm(q_nope, w_uk), q_rot], dim=-1) * self.scaling
    outputs = []
    for q, history in zip(query.split(lengths, dim=1), histories):
        t = q.shape[1]
        scores = torch.matmul(q, history.t())  # [H, T, L]
        if t > 1:  # a prompt chunk: each query sees the history before it and the chunk up to itself
            scores = scores.masked_fill(~causal_mask(t, history.shape[0], q.device), float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(history.dtype)
        outputs.append(torch.matmul(probs, history[:, :rank]))  # [H, T, r]
    latent_out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]  # [H, T, r]
    out = torch.bmm(latent_out, w_uv_t)  # [H, T, v]
    return out.transpose(0, 1).reshape(-1, heads * self.v_head_dim)


def _expanded(self, q_nope: torch.Tensor, q_rot: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """Attend one long chunk's queries [H, T, *] to its history expanded through kv_b_proj, as transformers does;
    return [T, H*v]."""
    heads, nope, rank = self.num_heads, self.qk_nope_head_dim, self.kv_lora_rank
    length, t = history.shape[0], q_nope.shape[1]
    kv = self.kv_b_proj(history[:, :rank]).view(length, heads, -1).transpose(0, 1)  # [H, L, nope + v]
    k_nope, values = kv.split([nope, self.v_head_dim], dim=-1)
    keys = torch.cat([k_nope, history[None, :, rank:].expand(heads, -1, -1)], dim=-1)  # [H, L, qk]
    query = torch.cat([q_nope, q_rot], dim=-1)
    mask = chunk_mask(t, length, query.device)
    out = F.scaled_dot_product_attention(query[None], keys[None], values[None], attn_mask=mask,
                                         is_causal=mask is None and t > 1, scale=self.scaling)  # [1, H, T, v]
    return out[0].transpose(0, 1).reshape(t, heads * self.v_head_dim)
