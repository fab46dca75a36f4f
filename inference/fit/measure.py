"""Measure a loaded transformers model, to hold the advisor's predictions against what really happens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from transformers import DynamicCache, PreTrainedModel

from .experts import experts_hit


def count_parameters(model: PreTrainedModel) -> int:
    """Return the loaded model's parameter count, tied weights once (as model.parameters() yields them)."""
    return sum(p.numel() for p in model.parameters())


def measure_weights(model: PreTrainedModel) -> dict:
    """Return the bytes actually allocated for parameters and buffers: distinct storages, plus CUDA's own count."""
    seen: dict[int, int] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_mkldnn:  # a weight laid out for oneDNN (the engine's packed bf16) has no storage to share
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
            continue
        storage = tensor.untyped_storage()
        seen[StorageWeakRef(storage).cdata] = storage.nbytes()  # tied or viewed tensors share one storage
    out = {"storage_bytes": sum(seen.values()), "tensors": len(seen)}
    if model.device.type == "cuda":
        out["cuda_allocated_bytes"] = torch.cuda.memory_allocated(model.device)
    return out


def measure_kv_bytes_per_token(model: PreTrainedModel, tokenizer, text: str = "The appliance keeps every answer "
                               "inside the building, and the ledger proves it.") -> dict:
    """Return KV-cache bytes per token, measured from the cache a real forward pass fills."""
    ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    total = 0
    for entry in cache.layers:
        for tensor in (getattr(entry, "keys", None), getattr(entry, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    tokens = ids.shape[1]
    return {"tokens": tokens, "cache_bytes": total, "bytes_per_token": total / tokens}


@dataclass
class ExpertHits:
    """Distinct experts hit per MoE layer and forward call, next to the uniform-routing prediction."""

    experts: int
    top_k: int
    calls: list[dict] = field(default_factory=list)  # one per (layer, forward): tokens, hit, predicted

    def summary(self) -> dict:
        """Return mean measured and predicted hits per token count."""
        by_tokens: dict[int, list[dict]] = {}
        for call in self.calls:
            by_tokens.setdefault(call["tokens"], []).append(call)
        return {t: {"calls": len(c), "measured_hit": sum(x["hit"] for x in c) / len(c), "predicted_hit": c[0]["predicted"]}
                for t, c in sorted(by_tokens.items())}


def record_expert_hits(model: PreTrainedModel) -> tuple[ExpertHits, list]:
    """Hook every router gate of a DeepSeek-V3-style model; return the hit log and the hook handles."""
    config = model.config
    hits = ExpertHits(config.n_routed_experts, config.num_experts_per_tok)
    handles = []

    def hook(module, inputs, output):
        # DeepseekV3TopkRouter returns (router_logits, topk_weights, topk_indices [tokens, k]).
        indices = output[2]
        tokens = indices.shape[0]
        hits.calls.append({"tokens": tokens, "hit": int(indices.unique().numel()),
                           "assignments": int(indices.numel()),
                           "predicted": experts_hit(hits.experts, hits.top_k, tokens)})

    for name, module in model.named_modules():
        if type(module).__name__.endswith("TopkRouter"):
            handles.append(module.register_forward_hook(hook))
    if not handles:
        raise ValueError("no router gates found; expert hits are measured on DeepSeek-V3-style models")
    return hits, handles


def measure_expert_hits(model: PreTrainedModel, tokenizer, prompts: list[str], new_tokens: int = 4) -> ExpertHits:
    """Run a batch of prompts (prefill, then greedy decode steps) and return the per-layer expert hits."""
    hits, handles = record_expert_hits(model)
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    return hits
