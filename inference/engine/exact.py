"""Run one forward over many requests so that each request's numbers equal running it alone, bit for bit.

Why this is needed: on CPU the BLAS picks different kernels for different row counts. A one-row linear
(`generate`'s decode step) is a GEMV; the same row inside a 16-row GEMM is summed in another order and
differs in the last bits, and so do GEMMs of 2-11 rows against larger ones. Over many tokens such bits
flip a greedy argmax. So a batched step computes every product with the row count of the unbatched run:

- a request's prompt (a segment of T tokens) goes through each linear as its own T-row product;
- single tokens (decode steps) go through a stride-0 `bmm`, which MKL computes exactly as a GEMV;
- MoE experts run once per prompt segment (each expert group then holds that prompt's tokens only), and
  single tokens through a per-row grouped product;
- sigmoid and SiLU, whose vectorised loop hands the last `numel % 32` elements to a scalar path that rounds
  differently, run per prompt and, for single tokens, one row at a time (a strided view makes the loop
  restart at every row, as it does for a one-row tensor);
- attention runs per request on that request's own keys and values (see `engine_attention`).

Everything else in the models (norms, rotary, softmax, top-k routing) works row by row and needs no help.
A step of one request alone runs unsplit ("plain"): that is the unbatched forward itself.
Linear layers get an exact `forward`; modules that call functional ops directly (routers, experts,
activations) run under a TorchFunctionMode. The step's layout travels in a thread-local, so several
engines in one process do not see each other's steps.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_tls = threading.local()

# Floats per iteration of ATen's vectorised elementwise loop on AVX-512 (2 × 16); a row whose length is a
# multiple of it never reaches the scalar tail, so its elementwise ops need no help.
VECTOR_CHUNK = 32
# torch's CPU bmm runs products of fewer multiply-adds than this with a naive loop instead of MKL, which
# sums in another order than the GEMV of a one-row linear; smaller layers are multiplied row by row.
SMALL_BMM = 400
# Source fragments of a forward that calls functional ops directly and so needs the interception mode.
_FUNCTIONAL_CALLS = ("linear(", "sigmoid(", "silu(", "grouped_mm(")


@dataclass
class StepLayout:
    """Where each request's tokens sit in a step's flat batch [1, N] and in the KV history [1, ΣL]."""

    token_lengths: list[int]  # new tokens per request: the prompt at prefill, 1 at decode
    history_lengths: list[int]  # cached + new tokens per request after this step
    cache: object = None  # the step's BatchCache, read by the attention function
    # How products are split now: "layout" (by row count), "rows" (each row alone) or "plain" (not at all).
    mode: str = field(default="layout", repr=False)

    @cached_property
    def n_tokens(self) -> int:
        return sum(self.token_lengths)

    @cached_property
    def n_history(self) -> int:
        return sum(self.history_lengths)

    @cached_property
    def token_runs(self) -> list[tuple[int, int, bool]]:
        """Return (start, length, singles) runs: consecutive one-token requests merge into one run."""
        return _runs(self.token_lengths)

    @cached_property
    def history_runs(self) -> list[tuple[int, int, bool]]:
        return _runs(self.history_lengths)


def _runs(lengths: list[int]) -> list[tuple[int, int, bool]]:
    runs: list[tuple[int, int, bool]] = []
    at = 0
    for n in lengths:
        if n == 1 and runs and runs[-1][2]:
            start, length, _ = runs[-1]
            runs[-1] = (start, length + 1, True)
        else:
            runs.append((at, n, n == 1))
        at += n
    return runs


def current_layout() -> StepLayout | None:
    """Return the layout of the step running on this thread, if any."""
    return getattr(_tls, "layout", None)


@contextmanager
def step_context(layout: StepLayout) -> Iterator[None]:
    """Make `layout` the current step of this thread while a model forward runs."""
    previous = current_layout()
    _tls.layout = layout
    try:
        yield
    finally:
        _tls.layout = previous


@contextmanager
def split_mode(layout: StepLayout, mode: str) -> Iterator[None]:
    """Temporarily change how products are split ("layout", "rows" or "plain")."""
    previous, layout.mode = layout.mode, mode
    try:
        yield
    finally:
        layout.mode = previous


# ---- pure numeric pieces -----------------------------------------------------------------------


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Return F.linear(x [M, K], weight [O, K], bias) with each row computed as a one-row GEMV."""
    m, k = x.shape
    if weight.numel() < SMALL_BMM:  # tiny layers (a shared-expert gate): one call per row
        return torch.cat([F.linear(row, weight, bias) for row in x.split(1)])  # [M, O]
    # A stride-0 batch of the same transposed weight: MKL runs each [1, K] @ [K, O] as the GEMV that a
    # one-row F.linear uses, yet it is one call for all M rows.
    out = torch.bmm(x.unsqueeze(1), weight.t().expand(m, k, weight.shape[0])).squeeze(1)  # [M, O]
    return out if bias is None else out + bias


def linear_runs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, runs: list[tuple[int, int, bool]]
) -> torch.Tensor:
    """Return F.linear(x [M, K]) with each prompt segment as its own product and single tokens per row."""
    parts = [
        linear_rows(x.narrow(0, s, n), weight, bias) if singles else F.linear(x.narrow(0, s, n), weight, bias)
        for s, n, singles in runs
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # [M, O]


def grouped_mm_rows(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Return grouped_mm(x [S, K], weight [E, K, O], offs [E]) with every row multiplied on its own."""
    out = x.new_empty(x.shape[0], weight.shape[-1])  # [S, O]
    start = 0
    for expert, end in enumerate(offs.tolist()):
        if end > start:
            # grouped_mm multiplies a one-row group as F.linear does: weight[expert] is the transposed [K, O].
            out[start:end] = linear_rows(x[start:end], weight[expert].t(), None)
        start = end
    return out


def unary_rows(op: Callable, x: torch.Tensor) -> torch.Tensor:
    """Return op(x [M, D]) with the elementwise loop run once per row, as for M one-row tensors."""
    m, d = x.shape
    padded = x.new_empty(m, d + 1)  # [M, D+1]: rows no longer adjacent, so the iterator cannot merge them
    padded[:, :d] = x
    return op(padded[:, :d])  # [M, D], contiguous


def unary_runs(op: Callable, x: torch.Tensor, runs: list[tuple[int, int, bool]]) -> torch.Tensor:
    """Return op(x [M, D]) computed per prompt segment and, for single tokens, per row."""
    parts = [unary_rows(op, x.narrow(0, s, n)) if singles else op(x.narrow(0, s, n)) for s, n, singles in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # [M, D]


def exact_linear(layout: StepLayout, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """Return F.linear(x [..., K]) split as the unbatched forward would have computed it."""
    flat = x.reshape(-1, x.shape[-1])  # [M, K]
    rows = flat.shape[0]
    if layout.mode == "rows":
        out = linear_rows(flat, weight, bias)
    elif rows == layout.n_tokens:
        out = linear_runs(flat, weight, bias, layout.token_runs)
    elif rows == layout.n_history:  # MLA expands every cached latent each step, one request at a time
        out = linear_runs(flat, weight, bias, layout.history_runs)
    else:  # the last position of each request before the LM head
        out = linear_rows(flat, weight, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def exact_unary(layout: StepLayout, op: Callable, x: torch.Tensor) -> torch.Tensor:
    """Return op(x [..., D]) for an elementwise op, split so that no element changes loop path."""
    if x.dim() == 0 or x.shape[-1] % VECTOR_CHUNK == 0:
        return op(x)
    flat = x.reshape(-1, x.shape[-1])  # [M, D]
    if layout.mode == "rows" or flat.shape[0] != layout.n_tokens:
        return unary_rows(op, flat).reshape(x.shape)
    return unary_runs(op, flat, layout.token_runs).reshape(x.shape)


# ---- interception ------------------------------------------------------------------------------

_UNARY = {torch.sigmoid: torch.sigmoid, torch.Tensor.sigmoid: torch.sigmoid, F.silu: F.silu}
_GROUPED_MM = tuple(f for f in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if f)


class _ExactMode(TorchFunctionMode):
    """Route the functional products and activations of a module through the exact splits."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        layout = current_layout()
        if layout is None or layout.mode == "plain":
            return func(*args, **kwargs)
        if func is F.linear:
            return exact_linear(layout, *args, **kwargs)
        if func in _UNARY:
            inplace = kwargs.pop("inplace", False)
            out = exact_unary(layout, _UNARY[func], *args, **kwargs)
            return args[0].copy_(out) if inplace else out
        if func in _GROUPED_MM and layout.mode == "rows":
            return grouped_mm_rows(args[0], args[1], kwargs["offs"] if "offs" in kwargs else args[2])
        return func(*args, **kwargs)


_MODE = _ExactMode()


@contextmanager
def _intercepting() -> Iterator[None]:
    """Enter the interception mode unless this thread is already inside it."""
    if getattr(_tls, "intercepting", False):
        yield
        return
    _tls.intercepting = True
    try:
        with _MODE:
            yield
    finally:
        _tls.intercepting = False


def _exact_linear_forward(module: nn.Linear) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        layout = current_layout()
        # Inside the interception mode F.linear is split by the mode itself; splitting here too would
        # split a prompt segment a second time, row by row.
        if layout is None or layout.mode == "plain" or getattr(_tls, "intercepting", False):
            return F.linear(x, module.weight, module.bias)
        return exact_linear(layout, x, module.weight, module.bias)

    return forward


def _forward_under_mode(module: nn.Module) -> Callable:
    original = module.forward

    def forward(*args, **kwargs):
        layout = current_layout()
        if layout is None or layout.mode == "plain":
            return original(*args, **kwargs)
        with _intercepting():
            return original(*args, **kwargs)

    return forward


def _split_experts_forward(module: nn.Module) -> Callable:
    original = module.forward

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        layout = current_layout()
        if layout is None or layout.mode == "plain" or hidden_states.shape[0] != layout.n_tokens:
            return original(hidden_states, top_k_index, top_k_weights)
        parts = []
        for start, length, singles in layout.token_runs:
            end = start + length
            args = (hidden_states[start:end], top_k_index[start:end], top_k_weights[start:end])
            if singles:  # each token alone, as a decode step of `generate` routes it
                with split_mode(layout, "rows"), _intercepting():
                    parts.append(original(*args))
            else:  # a prompt alone gives every expert the rows the unbatched prefill gave it
                with split_mode(layout, "plain"):
                    parts.append(original(*args))
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # [N, H]

    return forward


def is_experts_module(module: nn.Module) -> bool:
    """Return True for transformers' MoE expert collections (3-D weights, routed by top-k index)."""
    return type(module).__name__.endswith("Experts") and hasattr(module, "num_experts")


def _calls_functional(module: nn.Module) -> bool:
    """Return True when the module's own forward calls a product or activation function directly."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return True  # unknown code: intercept, to stay exact
    return any(call in source for call in _FUNCTIONAL_CALLS)


def make_exact(model: nn.Module) -> None:
    """Patch a model in place so that batched steps under `step_context` are bit-exact per request."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.forward = _exact_linear_forward(module)
        elif is_experts_module(module):
            module.forward = _split_experts_forward(module)
        elif _calls_functional(module):
            module.forward = _forward_under_mode(module)
