"""Count and classify every parameter of an architecture by building it on the meta device.

The meta device gives every tensor its real shape and dtype without allocating storage, so a 671B model
is built in about a second and the counts are exactly those of the loaded model: the same modules, the
same tied weights, the same fused expert tensors (transformers 5 stores a layer's routed experts as two
3-D tensors, `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from .source import config_from_dict

COMPONENTS = (
    "embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "router", "norms", "lm_head", "other",
)
_LAYER_RE = re.compile(r"\blayers\.(\d+)\.")
# Router weights: DeepSeek's `mlp.gate`, Mixtral's `block_sparse_moe.gate`, Qwen-MoE's `mlp.gate`; never `gate_proj`.
_ROUTER_RE = re.compile(r"\.(gate|router)\.(weight|bias|e_score_correction_bias)$")


@dataclass(frozen=True)
class TensorInfo:
    """One parameter or buffer of the built model: where it sits, what it is, how big."""

    name: str
    component: str
    numel: int
    dtype: torch.dtype
    is_parameter: bool
    layer: int | None


@dataclass(frozen=True)
class MoeShape:
    """The routed-expert geometry that the expert-hit maths needs."""

    experts: int  # routed experts per MoE layer (E)
    top_k: int  # experts each token is routed to (k)
    moe_layers: int
    params_per_expert: int
    shared_params_per_layer: int


@dataclass
class Accounting:
    """Parameter counts of one architecture, by component, with totals and active-per-token figures."""

    model_type: str
    build_dtype: torch.dtype
    tensors: list[TensorInfo]
    moe: MoeShape | None
    num_layers: int
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    mtp_params: int = 0  # unique parameters of multi-token-prediction modules transformers does not build
    mtp_disk_params: int = 0  # what those modules add to the checkpoint on disk (they repeat embedding and head)
    by_component: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        counts = Counter({c: 0 for c in COMPONENTS})
        for t in self.tensors:
            if t.is_parameter:
                counts[t.component] += t.numel
        self.by_component = dict(counts)

    @property
    def total(self) -> int:
        """Return every parameter transformers builds (and loads), tied weights once."""
        return sum(self.by_component.values())

    @property
    def routed_active(self) -> int:
        """Return the routed-expert parameters one token passes through (k of E per layer)."""
        if self.moe is None:
            return 0
        return self.by_component["routed_experts"] * self.moe.top_k // self.moe.experts

    @property
    def active(self) -> int:
        """Return parameters one token multiplies by: all but idle experts, without the embedding lookup."""
        # DeepSeek's own convention (README_WEIGHTS.md: "36.6B activated, including 0.9B for the output head"):
        # the input embedding is a row lookup, not a matrix product, so it is not counted as activated.
        embedding = 0 if self.tied_embeddings else self.by_component["embedding"]
        return self.total - self.by_component["routed_experts"] + self.routed_active - embedding

    @property
    def active_with_embedding(self) -> int:
        """Return active parameters counting the input embedding as well (the larger, looser convention)."""
        return self.total - self.by_component["routed_experts"] + self.routed_active

    @property
    def on_disk_total(self) -> int:
        """Return the parameter count of the full published checkpoint, MTP modules included."""
        return self.total + self.mtp_disk_params

    def to_dict(self) -> dict:
        """Return the counts as plain JSON-ready values."""
        return {
            "model_type": self.model_type,
            "total": self.total,
            "active": self.active,
            "active_with_embedding": self.active_with_embedding,
            "by_component": dict(self.by_component),
            "mtp_params": self.mtp_params,
            "on_disk_total": self.on_disk_total,
            "tied_embeddings": self.tied_embeddings,
            "moe": None if self.moe is None else vars(self.moe).copy(),
        }


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings while building a throwaway meta model, then restore the level."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def build_meta_model(config: PreTrainedConfig, dtype: torch.dtype = torch.bfloat16) -> PreTrainedModel:
    """Build the causal-LM for `config` on the meta device: real shapes and dtypes, no storage."""
    with _quiet_transformers(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def classify(name: str, owner: nn.Module) -> str:
    """Return the component a parameter belongs to, from its qualified name and owning module."""
    kind = type(owner).__name__
    if isinstance(owner, nn.Embedding) or name.endswith("embed_tokens.weight"):
        return "embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    if "Norm" in kind:
        return "norms"
    if ".shared_expert" in name:
        return "shared_experts"
    if kind.endswith("Experts") or ".experts." in name:
        return "routed_experts"
    if "Router" in kind or _ROUTER_RE.search(name):
        return "router"
    if "attn" in name or "attention" in name:
        return "attention"
    if ".mlp." in name or "feed_forward" in name:
        return "dense_mlp"
    return "other"


def _moe_geometry(config: PreTrainedConfig) -> tuple[int, int] | None:
    """Return (routed experts, experts per token) from the config, or None for a dense model."""
    experts = next((getattr(config, a, None) for a in ("n_routed_experts", "num_local_experts", "num_experts")
                    if getattr(config, a, None)), None)
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "moe_topk", None)
    return (int(experts), int(top_k)) if experts and top_k else None


def account(model: PreTrainedModel) -> Accounting:
    """Return the classified parameter and buffer inventory of a built (meta or loaded) model."""
    owners = dict(model.named_modules())
    tensors = []
    # named_parameters() skips tied duplicates, as model.parameters() does when the loaded model is counted.
    for name, param in model.named_parameters():
        owner = owners[name.rpartition(".")[0]]
        tensors.append(_info(name, classify(name, owner), param, True))
    for name, buf in model.named_buffers():
        owner = owners[name.rpartition(".")[0]]
        tensors.append(_info(name, classify(name, owner), buf, False))
    config = model.config
    geometry = _moe_geometry(config)
    acc = Accounting(
        model_type=config.model_type,
        build_dtype=model.dtype,
        tensors=tensors,
        moe=None,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        tied_embeddings=not any(t.component == "lm_head" for t in tensors if t.is_parameter),
    )
    if geometry and acc.by_component["routed_experts"]:
        experts, top_k = geometry
        moe_layers = {t.layer for t in tensors if t.component == "routed_experts"}
        shared = acc.by_component["shared_experts"] // len(moe_layers)
        acc.moe = MoeShape(experts, top_k, len(moe_layers),
                           acc.by_component["routed_experts"] // (experts * len(moe_layers)), shared)
    acc.mtp_params, acc.mtp_disk_params = _mtp_params(acc, config)
    return acc


def _info(name: str, component: str, tensor: torch.Tensor, is_parameter: bool) -> TensorInfo:
    """Return the TensorInfo of one named tensor."""
    match = _LAYER_RE.search(name)
    return TensorInfo(name, component, tensor.numel(), tensor.dtype, is_parameter,
                      int(match.group(1)) if match else None)


def _mtp_params(acc: Accounting, config: PreTrainedConfig) -> tuple[int, int]:
    """Return (unique, on-disk) parameters of DeepSeek-style MTP modules that transformers does not build."""
    n = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
    if not n or not acc.model_type.startswith("deepseek_v3"):
        return 0, 0
    # README_WEIGHTS.md of DeepSeek-V3: each MTP module is one more decoder layer shaped like the last one,
    # plus enorm, hnorm (RMSNorms over H), eh_proj (2H -> H) and shared_head.norm; embed_tokens and
    # shared_head.head share the main model's, yet the checkpoint stores them again under layers.61.
    last = acc.num_layers - 1
    layer = sum(t.numel for t in acc.tensors if t.is_parameter and t.layer == last)
    h = acc.hidden_size
    unique = n * (layer + 2 * h * h + 3 * h)
    repeated = n * (acc.by_component["embedding"] + acc.by_component["lm_head"])
    return unique, unique + repeated


@lru_cache(maxsize=8)
def _cached_meta(config_json: str, dtype: torch.dtype) -> PreTrainedModel:
    """Return a meta model for a config serialised as JSON (meta models hold no memory, so caching is cheap)."""
    return build_meta_model(config_from_dict(json.loads(config_json)), dtype)


def meta_model_for(config: PreTrainedConfig, dtype: torch.dtype = torch.bfloat16) -> PreTrainedModel:
    """Return a (cached) meta model for `config`, so one analysis builds each architecture once."""
    return _cached_meta(config.to_json_string(use_diff=False), dtype)
