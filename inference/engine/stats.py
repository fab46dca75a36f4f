"""The engine's counters and the facts it reads from the model and the machine."""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

import psutil
import torch

from inference.engine.config import DEFAULT_CPU_KV_FRACTION, DEFAULT_GPU_KV_FRACTION
from inference.engine.request import RequestState


def eos_token_ids(model, tokenizer) -> set[int]:
    """Return every id that ends an answer: the generation config's EOS list plus the tokenizer's EOS."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for value in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return ids


def auto_kv_budget(device: str) -> int:
    """Return a KV-cache budget in bytes from the memory left after the weights were loaded."""
    if device == "cuda":
        free = sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
        return int(free * DEFAULT_GPU_KV_FRACTION)
    return int(psutil.virtual_memory().available * DEFAULT_CPU_KV_FRACTION)


@dataclass
class EngineStats:
    """Counters since the engine started, written by the worker and read by /metrics."""

    steps: int = 0
    step_seconds: float = 0.0
    batched_requests: int = 0  # sum over steps of the requests in the step
    step_tokens: int = 0  # sum over steps of the tokens fed to the model (prompts + decode tokens)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: collections.Counter = field(default_factory=collections.Counter)  # finish reason → requests
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_step(self, requests: int, tokens: int, seconds: float) -> None:
        with self._lock:
            self.steps += 1
            self.batched_requests += requests
            self.step_tokens += tokens
            self.step_seconds += seconds

    def record_finish(self, state: RequestState) -> None:
        with self._lock:
            self.finished[state.finish_reason] += 1
            if state.started_at is not None:
                self.prompt_tokens += len(state.prompt_ids)
            self.generated_tokens += len(state.output_ids)

    def as_dict(self) -> dict:
        """Return the counters as plain data."""
        with self._lock:
            return {
                "steps": self.steps,
                "step_seconds": self.step_seconds,
                "mean_batch_size": self.batched_requests / self.steps if self.steps else 0.0,
                "step_tokens": self.step_tokens,
                "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens,
                "finished": dict(self.finished),
            }
