"""MoE telemetry, "the idle cooks": how many tokens each expert of each layer receives in every step.

A forward pre-hook on every experts module counts its top-k routing (one `bincount` on the device, no
sync); the engine closes each step with one copy of the [layers, experts] counts to the host. From those
come, per step and layer, the fraction of experts that received no token and the tokens per active expert,
and over the deployment's life the hottest and coldest experts. `snapshot(engine)` is what the console and
/metrics read: numbers only, which the console draws (appliance.console.charts.expert_heatmap).
"""

from __future__ import annotations

import collections
import re
import threading

import torch
from torch import nn

from inference.engine.exact import is_experts_module

HISTORY_STEPS = 512  # steps kept for the per-step figures
EXTREMES = 3  # hottest / coldest experts listed per layer


class ExpertProbe:
    """Count the tokens routed to each expert of each MoE layer, step by step."""

    def __init__(self, model: nn.Module, history: int = HISTORY_STEPS) -> None:
        found = [(name, m) for name, m in model.named_modules() if is_experts_module(m)]
        self.layers = [_layer_index(name, i) for i, (name, _) in enumerate(found)]
        self.num_experts = found[0][1].num_experts if found else 0
        self.top_k = int(getattr(model.config, "num_experts_per_tok", 0) or 0)
        self._step: list[torch.Tensor | None] = [None] * len(found)
        self._lock = threading.Lock()
        self.totals = torch.zeros(len(found), self.num_experts, dtype=torch.int64)  # [L, E] since load
        self.steps = 0
        self.history: collections.deque[dict] = collections.deque(maxlen=history)
        for i, (_, module) in enumerate(found):
            module.register_forward_pre_hook(self._hook(i))

    @property
    def active(self) -> bool:
        return bool(self.layers)

    def _hook(self, i: int):
        def count(module: nn.Module, args: tuple) -> None:
            top_k_index = args[1]  # [tokens, k]
            counts = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts)[: self.num_experts]
            self._step[i] = counts if self._step[i] is None else self._step[i] + counts

        return count

    def end_step(self) -> None:
        """Close a step: move its counts to the host and derive the step's figures."""
        if not self.active or self._step[0] is None:
            return self.discard_step()
        counts = torch.stack([c.cpu() if c is not None else torch.zeros(self.num_experts, dtype=torch.int64)
                              for c in self._step])  # [L, E]
        self._step = [None] * len(self._step)
        routed = counts.sum(dim=-1)  # [L]: token-expert assignments per layer
        active = (counts > 0).sum(dim=-1)  # [L]
        idle = (1.0 - active / self.num_experts).tolist()
        per_active = (routed / active.clamp(min=1)).tolist()
        tokens = int(routed[0]) // max(1, self.top_k) if self.top_k else int(routed[0])
        with self._lock:
            self.totals += counts
            self.steps += 1
            self.history.append({"tokens": tokens, "idle_fraction": idle, "tokens_per_active_expert": per_active})

    def discard_step(self) -> None:
        """Forget the counts of a step that failed or was not served."""
        self._step = [None] * len(self._step)

    def snapshot(self) -> dict:
        """Return the figures of this deployment as plain data."""
        if not self.active:
            return {"moe": False}
        with self._lock:
            history = list(self.history)
            totals = self.totals.clone()
            steps = self.steps
        per_layer = []
        for j, layer in enumerate(self.layers):
            idle = [h["idle_fraction"][j] for h in history]
            per_active = [h["tokens_per_active_expert"][j] for h in history]
            order = totals[j].argsort(descending=True, stable=True).tolist()
            per_layer.append({
                "layer": layer,
                "idle_fraction": _mean(idle),
                "tokens_per_active_expert": _mean(per_active),
                "expert_tokens": totals[j].tolist(),
                "hottest": [[e, int(totals[j, e])] for e in order[:EXTREMES]],
                "coldest": [[e, int(totals[j, e])] for e in reversed(order[-EXTREMES:])],
            })
        recent = [{"tokens": h["tokens"], "idle_fraction": _mean(h["idle_fraction"])} for h in history[-64:]]
        return {
            "moe": True,
            "num_experts": self.num_experts,
            "experts_per_token": self.top_k,
            "steps": steps,
            "window_steps": len(history),
            "idle_fraction": _mean([_mean(h["idle_fraction"]) for h in history]),
            "tokens_per_active_expert": _mean([_mean(h["tokens_per_active_expert"]) for h in history]),
            "layers": per_layer,
            "recent": recent,
        }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _layer_index(name: str, fallback: int) -> int:
    match = re.search(r"layers\.(\d+)\.", name)
    return int(match.group(1)) if match else fallback


def snapshot(engine) -> dict:
    """Return the MoE telemetry of a running engine, for the console and /metrics."""
    probe = getattr(engine, "probe", None)
    data = probe.snapshot() if probe is not None else {"moe": False}
    return {"model": engine.model_dir.name, **data}
