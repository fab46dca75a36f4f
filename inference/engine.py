"""The in-process inference engine: one worker thread owns the model and serves a bounded FIFO queue.

The asyncio side submits requests and iterates their chunks; the worker runs prefill, then one decode
step at a time with the model's KV cache, samples, detokenizes and hands chunks back through a
per-request asyncio.Queue. This version serves one request at a time; `_step` advances a single request
by one token so that continuous batching can later run it over a batch of running requests.
No Django here: the engine takes a model directory and requests, and yields tokens.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel
from transformers.utils import is_accelerate_available

from inference.detokenize import TextStream
from inference.request_state import (
    Chunk,
    EngineBusy,
    EngineClosed,
    PromptTooLong,
    RequestState,
    RequestStatus,
    SamplingParams,
)
from inference.sampling import make_generator, sample

__all__ = [
    "Chunk",
    "Engine",
    "EngineBusy",
    "EngineClosed",
    "PromptTooLong",
    "RequestHandle",
    "RequestState",
    "RequestStatus",
    "SamplingParams",
]

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """Return "cuda" or "cpu" for a requested device of "auto", "cuda" or "cpu"."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f'device must be "auto", "cuda" or "cpu", got {device!r}')
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no GPU")
    return device


def load_model(model_dir: Path, device: str) -> PreTrainedModel:
    """Load a causal LM from a local directory only: safetensors weights, no hub, no remote code."""
    kwargs = dict(local_files_only=True, trust_remote_code=False, use_safetensors=True)
    if device == "cpu":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    elif is_accelerate_available():
        # bf16 halves memory and is the GPUs' native matmul type; "auto" spreads layers over every visible GPU.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="auto", **kwargs)
    else:
        # transformers needs `accelerate` for any device_map; without it one GPU still works.
        log.warning("accelerate is not installed: loading %s onto one GPU only", model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **kwargs).to("cuda")
    return model.eval()


def eos_token_ids(model: PreTrainedModel, tokenizer) -> set[int]:
    """Return every id that ends an answer: the generation config's EOS list plus the tokenizer's EOS."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for value in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return ids


class _WaitingQueue:
    """Bounded FIFO of queued requests, shared by the event loop (put, discard) and the worker (get)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"queue_limit must be at least 1, got {limit}")
        self.limit = limit
        self._items: collections.deque[RequestState] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, state: RequestState) -> None:
        """Append a request, or raise EngineBusy when `limit` requests are already waiting."""
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if len(self._items) >= self.limit:
                raise EngineBusy(f"the engine's queue is full ({self.limit} requests waiting); retry later")
            self._items.append(state)
            self._cond.notify()

    def get(self) -> RequestState | None:
        """Block until a request is waiting and return it, or return None once the queue is closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed)
            return None if self._closed else self._items.popleft()

    def discard(self, state: RequestState) -> bool:
        """Remove a still-waiting request; return False when the worker already took it."""
        with self._cond:
            try:
                self._items.remove(state)
            except ValueError:
                return False
            return True

    def close(self) -> list[RequestState]:
        """Refuse new requests, wake the worker, and return the requests that never started."""
        with self._cond:
            self._closed = True
            drained = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return drained

    def __len__(self) -> int:
        return len(self._items)


class RequestHandle:
    """A submitted request: `async for` yields its Chunks; stopping early cancels the request."""

    def __init__(self, state: RequestState, chunks: asyncio.Queue[Chunk], engine: Engine) -> None:
        self.state = state
        self._chunks = chunks
        self._engine = engine
        self._iterated = False

    @property
    def request_id(self) -> str:
        return self.state.request_id

    def cancel(self) -> None:
        """Ask the engine to drop this request; a final "cancelled" chunk follows unless it already finished."""
        self._engine._cancel(self.state)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        if self._iterated:
            raise RuntimeError("a request's chunks can be iterated only once")
        self._iterated = True
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        """Yield chunks until the final one; on early exit (break, task cancelled) cancel the request."""
        finished = False
        try:
            while not finished:
                chunk = await self._chunks.get()
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            if not finished:
                self.cancel()


class Engine:
    """Serve one local model: a worker thread owns it and works through a bounded request queue."""

    def __init__(self, model_dir: str | Path, *, device: str = "auto", queue_limit: int = 64) -> None:
        self._waiting = _WaitingQueue(queue_limit)  # first, so a bad limit fails before a slow load
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True, trust_remote_code=False)
        self.model: PreTrainedModel | None = load_model(self.model_dir, self.device)
        config = self.model.config
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or self.tokenizer.model_max_length)
        self.eos_token_ids = eos_token_ids(self.model, self.tokenizer)
        embeddings = self.model.get_input_embeddings()
        self.vocab_size = embeddings.num_embeddings
        self._input_device = embeddings.weight.device  # with device_map="auto" the first layer's GPU
        forward_params = inspect.signature(self.model.forward).parameters
        # transformers 5.24 calls the KV cache argument `cache` (`past_key_values` is deprecated until 5.40);
        # releases from before the rename only know the old name.
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        # Computing logits for the last position only saves a [T, V] matmul on every prefill.
        self._logits_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"engine:{self.model_dir.name}", daemon=True)
        self._thread.start()
        log.info(
            "engine ready: %s on %s (%s), context %d tokens",
            self.model_dir, self.device, self.model.dtype, self.context_length,
        )

    # ---- asyncio side -------------------------------------------------------------------------

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Return the prompt ids for a chat, ending with the prompt for the assistant's turn."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template writes its own special tokens (BOS, turn markers); adding them again would double BOS.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def submit(self, prompt_ids: Iterable[int], params: SamplingParams = SamplingParams()) -> RequestHandle:
        """Validate and queue a request from inside a running event loop; raise at once if it cannot run."""
        if self._closed.is_set():
            raise EngineClosed("the engine is closed")
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        # Checked here because an out-of-range id on a GPU is a device-side assert that poisons the CUDA context.
        outside = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if outside is not None:
            raise ValueError(f"token id {outside} is outside the vocabulary [0, {self.vocab_size})")
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise PromptTooLong(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the model's context length of {self.context_length} tokens"
            )
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Chunk] = asyncio.Queue()

        def deliver(chunk: Chunk) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, chunk)

        state = RequestState(prompt_ids, params, deliver)
        self._waiting.put(state)
        return RequestHandle(state, chunks, self)

    async def stream(self, prompt_ids: Iterable[int], params: SamplingParams = SamplingParams()) -> AsyncIterator[Chunk]:
        """Submit a request and yield its chunks; closing the iterator early cancels the request."""
        handle = self.submit(prompt_ids, params)
        try:
            async for chunk in handle:
                yield chunk
        finally:
            handle.cancel()  # a no-op when the request already finished

    def _cancel(self, state: RequestState) -> None:
        """Cancel a request: drop it from the queue, or flag it for the worker if it is running."""
        if state.finished:
            return
        state.cancel_requested.set()
        if self._waiting.discard(state):  # it never started, so the worker will never see it
            self._end(state, "cancelled")

    # ---- worker thread --------------------------------------------------------------------------

    def _run(self) -> None:
        """Serve queued requests in arrival order until the engine closes."""
        with torch.inference_mode():
            while (state := self._waiting.get()) is not None:
                state.start()
                while not state.finished:
                    self._step(state)

    def _step(self, state: RequestState) -> None:
        """Advance one request by one token: run the model, sample, postprocess; errors end only this request."""
        if self._closed.is_set():
            return self._end(state, "error", "the engine was closed while the request was running")
        if state.cancel_requested.is_set():
            return self._end(state, "cancelled")
        params = state.params
        try:
            logits = self._prefill(state) if state.cache is None else self._decode_one_token(state)  # [1, V]
            if state.generator is None and params.temperature > 0:
                state.generator = make_generator(params.seed, logits.device)
            token = int(sample(logits, params.temperature, params.top_p, state.generator)[0])
            self._postprocess(state, token)
        except Exception as exc:  # one failing request must not take the engine down with it
            log.exception("request %s failed", state.request_id)
            self._end(state, "error", f"{type(exc).__name__}: {exc}")
            if self.device == "cuda":
                torch.cuda.empty_cache()  # after an OOM, give the freed KV cache back before the next request

    def _forward(self, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Run input_ids [1, T] through the model, extending `cache`; return last-position logits [1, V]."""
        out = self.model(input_ids=input_ids, use_cache=True, **{self._cache_kwarg: cache}, **self._logits_kwargs)
        # float32 before sampling, as generate() does, so greedy picks the same argmax.
        return out.logits[:, -1].float()  # [1, V]

    def _prefill(self, state: RequestState) -> torch.Tensor:
        """Run the whole prompt once, filling a fresh KV cache; return logits [1, V] for the first new token."""
        state.cache = DynamicCache(config=self.model.config)
        state.text = TextStream(self.tokenizer, state.prompt_ids, state.params.stop)
        input_ids = torch.tensor([state.prompt_ids], device=self._input_device)  # [1, T]
        return self._forward(input_ids, state.cache)

    def _decode_one_token(self, state: RequestState) -> torch.Tensor:
        """Feed back the last sampled token against the KV cache; return logits [1, V] for the next one."""
        input_ids = torch.tensor([[state.output_ids[-1]]], device=self._input_device)  # [1, 1]
        return self._forward(input_ids, state.cache)

    def _postprocess(self, state: RequestState, token: int) -> None:
        """Record a sampled token, decide whether the request is done, and emit any new text."""
        state.output_ids.append(token)
        if state.first_token_at is None:
            state.first_token_at = time.monotonic()
        if token in self.eos_token_ids:
            text, _ = state.text.finish()  # the EOS token itself has no text; only held-back text remains
            return self._end(state, "stop", text=text)
        text, stopped = state.text.push(token)
        if stopped:
            return self._end(state, "stop", text=text)
        if len(state.output_ids) >= state.params.max_tokens:
            rest, stopped = state.text.finish()
            return self._end(state, "stop" if stopped else "length", text=text + rest)
        if text:
            self._emit(state, state.chunk(text))

    def _end(self, state: RequestState, reason: str, error: str | None = None, *, text: str = "") -> None:
        """Finish a request and send its final chunk."""
        state.finish(reason, error)
        self._emit(state, state.chunk(text))

    def _emit(self, state: RequestState, chunk: Chunk) -> None:
        """Hand a chunk to the request's event loop, cancelling the request if that loop is gone."""
        try:
            state.deliver(chunk)
        except RuntimeError:  # the consumer's event loop is closed: nobody will read this answer
            state.cancel_requested.set()

    # ---- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the worker thread, fail requests still queued, and free the model and GPU memory."""
        if self._closed.is_set():
            return
        self._closed.set()
        for state in self._waiting.close():
            self._end(state, "error", "the engine was closed before the request started")
        self._thread.join()
        self.model = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
