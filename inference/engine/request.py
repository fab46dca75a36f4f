"""The engine's request vocabulary: sampling parameters, streamed chunks, errors and per-request state.

No torch modules and no Django here: the asyncio side, the worker thread and the scheduler all speak in
these types.
"""

from __future__ import annotations

import enum
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FINISH_REASONS = ("stop", "length", "cancelled", "error")
MAX_TOP_LOGPROBS = 20


class EngineBusy(Exception):
    """The engine's queue is full; the client should retry later."""


class PromptTooLong(ValueError):
    """The prompt plus max_tokens does not fit in the model's context (or in the deployment's KV budget)."""


class EngineClosed(RuntimeError):
    """The engine was closed and accepts no more requests."""


class FieldNotHonoured(ValueError):
    """The deployment's engine cannot do what a request field asks (an external engine's gap); a 400 naming it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → no top-k cut
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per earlier occurrence of a generated token
    # Constrained decoding: llguidance grammar text (grammar.json_schema_grammar builds it from a JSON schema).
    # Plain text so it crosses a process boundary; the engine compiles it when it admits the request.
    grammar: str | None = None
    # Log probabilities: None → none; 0..20 → each generated token's own, with that many most likely alternatives.
    logprobs: int | None = None
    # Extensions, as in vLLM. logit_bias: token id → added to its logit (OpenAI's -100..100).
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0  # end-of-sequence and stop_token_ids cannot come before this many tokens
    ignore_eos: bool = False  # never end on end-of-sequence: the answer runs to max_tokens (benchmarks)
    stop_token_ids: tuple[int, ...] = ()  # more token ids that end the answer, left out of its text

    def __post_init__(self) -> None:
        """Reject values the sampler cannot honour, before the request reaches the queue."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not self.temperature >= 0:  # also rejects nan
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if isinstance(self.stop, str):
            raise TypeError("stop must be a tuple of strings, not a single string")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}] alternatives, got {self.logprobs}")
        if self.logit_bias is not None:
            bad = next((v for v in self.logit_bias.values() if not -100 <= v <= 100), None)
            if bad is not None:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bad}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise TypeError("grammar must be grammar text (str) or None")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        """Return True when the next token is the argmax of the (penalised) logits."""
        return self.temperature == 0

    @property
    def plain(self) -> bool:
        """Return True when nothing but temperature, top-p and top-k shapes the logits."""
        return not (self.penalised or self.logit_bias)

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


@dataclass
class Chunk:
    """One piece of a streamed answer; the last one of a request has finish_reason set."""

    text: str  # text delta, may be ""
    finish_reason: str | None  # None while running; one of FINISH_REASONS at the end
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache instead of being computed
    # With SamplingParams.logprobs: one entry per token generated since the last chunk, as plain data:
    # {"token": text, "logprob": float, "top": [[text, logprob], ...]} (the model's own distribution).
    logprobs: list | None = None
    # With an error: whatever ran the request became unreachable (another node of the appliance died under it),
    # so the API answers 503 rather than 500.
    unavailable: bool = False


class RequestStatus(enum.Enum):
    QUEUED = "queued"  # waiting for admission (queue slot taken, no KV cache yet), or preempted and waiting again
    RUNNING = "running"  # admitted: holds a KV reservation and is in every step until it finishes or is preempted
    FINISHED = "finished"


@dataclass(eq=False)
class RequestState:
    """Everything the engine knows about one request; its first start and its finish stamp the time (monotonic
    seconds). The API measures queue time and time to first token itself, on the web side."""

    prompt_ids: list[int]
    params: SamplingParams
    deliver: Callable[[Chunk], None] = field(repr=False)  # hands a chunk to the consumer (on its event loop)
    loop: Any = field(default=None, repr=False)  # the consumer's event loop; None → call `deliver` directly
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Requests of the same scope (a team) may reuse each other's cached prompt KV; None never shares.
    cache_scope: str | None = None
    status: RequestStatus = RequestStatus.QUEUED
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    started_at: float | None = None  # also tells the scheduler whether the request was ever admitted
    finished_at: float | None = None
    # Set from the asyncio side (client gone); read by the worker between steps.
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)
    # Worker-owned decoding state, dropped when the request finishes so its KV cache memory is freed.
    cache: Any = field(default=None, repr=False)  # the request's KVStore
    generator: Any = field(default=None, repr=False)
    text: Any = field(default=None, repr=False)
    token_counts: Any = field(default=None, repr=False)  # [V] occurrences of generated tokens, for penalties
    constraint: Any = field(default=None, repr=False)  # the compiled grammar (grammar.Constraint), if any
    pending_logprobs: list = field(default_factory=list, repr=False)  # entries not yet sent in a chunk
    kv_reserved: int = 0  # bytes of the deployment's KV budget held for this request while it runs
    kv_tokens: int = 0  # tokens of KV cache those bytes pay for; the KV store never grows past it
    num_computed: int = 0  # tokens of prompt_ids + output_ids whose KV is in the cache
    cached_tokens: int = 0  # of the prompt, tokens taken from the prefix cache at first admission
    preemptions: int = 0  # times the request lost its KV cache to others and was recomputed
    # Scheduler-owned: hashes of the request's full KV blocks (prefix-cache keys), and the cached blocks
    # matched at admission, whose KV the worker copies into the new store.
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    prefix_blocks: list[Any] = field(default_factory=list, repr=False)

    @property
    def max_total_tokens(self) -> int:
        """Return the most tokens this request can ever hold in its KV cache."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def num_tokens(self) -> int:
        """Return the tokens known so far: the prompt and every generated token."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pending_tokens(self) -> int:
        """Return the known tokens not yet in the KV cache (the prompt, or the last sampled token)."""
        return self.num_tokens - self.num_computed

    def token_slice(self, start: int, n: int) -> list[int]:
        """Return `n` known tokens from position `start` (prompt then output), the input of one step."""
        prompt = len(self.prompt_ids)
        if start + n <= prompt:
            return self.prompt_ids[start : start + n]
        if start >= prompt:  # a decode step: no copy of the whole sequence
            return self.output_ids[start - prompt : start - prompt + n]
        return self.prompt_ids[start:] + self.output_ids[: start + n - prompt]

    @property
    def finished(self) -> bool:
        """Return True once the request has a finish reason."""
        return self.status is RequestStatus.FINISHED

    def start(self) -> None:
        """Mark the request as taken by the worker (again, after a preemption: the first start is kept)."""
        self.status = RequestStatus.RUNNING
        if self.started_at is None:
            self.started_at = time.monotonic()

    def preempt(self) -> None:
        """Drop the request's KV cache; it waits again and recomputes its tokens when readmitted."""
        self.status = RequestStatus.QUEUED
        self.cache, self.num_computed, self.prefix_blocks = None, 0, []
        self.preemptions += 1

    def finish(self, reason: str, error: str | None = None) -> None:
        """Mark the request as done and drop its decoding state."""
        assert reason in FINISH_REASONS, reason
        self.status, self.finish_reason, self.error = RequestStatus.FINISHED, reason, error
        self.finished_at = time.monotonic()
        self.cache = self.generator = self.text = self.token_counts = self.constraint = None
        self.prefix_blocks = []

    def chunk(self, text: str) -> Chunk:
        """Return a chunk carrying `text` and the request's current counts and finish state."""
        logprobs = None
        if self.params.logprobs is not None:
            logprobs, self.pending_logprobs = self.pending_logprobs, []
        return Chunk(text, self.finish_reason, len(self.prompt_ids), len(self.output_ids), self.error,
                     self.cached_tokens, logprobs)
