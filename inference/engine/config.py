"""The engine's settings: one validated dataclass; the engine accepts only its fields."""

from __future__ import annotations

from dataclasses import dataclass, fields

# The weight precisions a deployment may ask for (precision.py resolves "auto" per machine). Here, not in
# precision.py, because the web process validates its config and must not load torch to do so.
PRECISIONS = ("auto", "float32", "bfloat16", "int8")

DEFAULT_CPU_KV_FRACTION = 0.25  # of the memory available when the model is loaded, on CPU
DEFAULT_GPU_KV_FRACTION = 0.85  # of the GPUs' free memory after the weights are loaded


@dataclass(frozen=True)
class EngineConfig:
    """How one deployment is served."""

    device: str = "auto"  # "auto" (all visible GPUs in bf16 when CUDA is present, else CPU), "cuda" or "cpu"
    queue_limit: int = 64  # requests waiting for admission before submit answers EngineBusy (HTTP 429)
    # KV-cache memory the deployment may hold (running requests and the prefix cache together); None sizes it
    # from free memory after loading. A request is admitted for what it uses now, its reservation grows as it
    # decodes, and when the budget runs out the newest running request is preempted and later recomputed.
    kv_budget_bytes: int | None = None
    max_batch_size: int = 128  # requests decoding together in one step
    # The token budget of a step: every running decode feeds its one token, and prompts take at most
    # `max_prefill_tokens` more (a burst of new requests is spread over a few steps, so the first of them
    # stream sooner). While any request decodes, one prompt takes at most `decoding_prefill_tokens` per step:
    # a long prompt is prefilled in chunks interleaved with the decodes, since on CPU a step's time grows with
    # its tokens and every decoding stream waits for the whole step (measured on the 2-core box, 15 streams
    # and a 2,044-token prompt on demo-dense: their p95 inter-token latency 1.6-1.8x theirs alone with chunks
    # of 48 tokens, 2.3-2.5x with 112, 4-4.5x with 241, 14-20x prefilling it whole). Short prompts still start
    # whole: a cap on the step's prompt tokens as small as that costs 16 and 64 clients of short chats a fifth
    # of their tokens/s and triples their TTFT.
    max_prefill_tokens: int = 256
    decoding_prefill_tokens: int = 48
    # Share of the KV budget kept free when admitting a request while others run, so that running requests
    # have room to grow before anyone has to be preempted.
    kv_headroom: float = 0.05
    # Reuse the KV of a prompt prefix already computed for the same cache scope (a team): shared system
    # prompts, every next turn of a chat. Keyed by a hash of the whole prefix, in blocks of kv_block_tokens.
    prefix_cache: bool = True
    kv_block_tokens: int = 16
    # Seconds between two events of one stream while it is running (its first text and its end are never held
    # back). 0 sends every step's text at once; a few tens of ms lets a busy web process write fewer events.
    stream_interval_s: float = 0.02
    scheduler: str = "fifo"  # a key of engine_scheduler.SCHEDULERS
    # Bit-exact batching, opt-in on every device: each request's numbers equal running it alone (unbatched
    # generate), at about 1.4x the cost of a plain batched step. Off: plain batched products.
    # Exact mode also keeps the scheduling that unbatched generate implies: whole-prompt prefill (a chunk or
    # a cached prefix computes the same numbers in another order), and a worst-case KV reservation (prompt +
    # max_tokens) at admission, since recomputing a preempted request would change its numbers.
    exact: bool = False
    telemetry: bool = True  # record MoE router counts per step (the idle-cooks figures)
    # torch intra-op threads of the process. None: on CPU half the cores, since the event loop serving HTTP
    # shares the box and an oversubscribed OpenMP barrier costs a scheduler time slice per op; on GPU torch's
    # default. (Measured on the 2-core box: a 16-prompt prefill takes 18 ms on 1 thread, 0.5-8 s on 2 under load.)
    threads: int | None = None
    # Weights' number format: "auto" (bfloat16 on GPUs, and on CPUs that compute it natively, AVX512-BF16 or
    # AMX, for models of 512 MiB of weight files or more; else float32, and float32 on CPU in exact mode),
    # "float32", "bfloat16", or "int8" (weight-only, CPU).
    precision: str = "auto"

    def __post_init__(self) -> None:
        """Reject settings the engine cannot run with, naming the field."""
        for name in ("queue_limit", "max_batch_size", "max_prefill_tokens", "decoding_prefill_tokens",
                     "kv_block_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.kv_budget_bytes is not None and self.kv_budget_bytes < 1:
            raise ValueError(f"kv_budget_bytes must be positive, got {self.kv_budget_bytes}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f'device must be "auto", "cuda" or "cpu", got {self.device!r}')
        if not self.stream_interval_s >= 0:
            raise ValueError(f"stream_interval_s must be >= 0, got {self.stream_interval_s}")
        if not 0 <= self.kv_headroom < 1:
            raise ValueError(f"kv_headroom must be in [0, 1), got {self.kv_headroom}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.precision == "int8" and self.exact:
            raise ValueError("precision int8 cannot run in exact mode (its products are not split per request)")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """Build a config from keyword arguments, refusing names that are not settings."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine setting(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)
