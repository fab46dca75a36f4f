"""The in-process inference engine: one worker thread owns the model and runs continuous batching.

The asyncio side submits requests and iterates their chunks. The worker loops over one narrow step:
the scheduler picks the batch within a token budget (running requests decode a token, prompts prefill a
chunk, newly admitted ones start with a cached prefix where their scope has one, all in one forward), the
model runs once, every request whose known tokens are all computed samples its next one, and
postprocessing detokenizes, checks stops and retires finished requests, whose KV reservation goes back to
the budget and whose full blocks go into the prefix cache. Chunks go back
through a per-request asyncio.Queue, one thread hop per event loop per step.
No Django here: the engine takes a model directory and requests, and yields tokens.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import psutil
import torch

from inference.engine.detokenize import TextStream
from inference.engine.cache import KVStore
from inference.engine.config import EngineConfig
from inference.engine.prompt import encode_chat, load_tokenizer
from inference.engine.outputs import OutputRouter, RequestHandle, deliver_now
from inference.engine.precision import resolve_precision, weight_bytes
from inference.engine.runner import Runner, load_model, resolve_device
from inference.engine.prefix_cache import PrefixCache
from inference.engine.scheduler import SCHEDULERS, StepPlan
from inference.engine.stats import EngineStats, auto_kv_budget, eos_token_ids
from inference.fit.bounds import check_model_dir
from inference.fit.measure import count_parameters
from inference.engine.request import (
    Chunk,
    EngineBusy,
    EngineClosed,
    PromptTooLong,
    RequestState,
    RequestStatus,
    SamplingParams,
)
from inference.engine.constraint import Constraint, GrammarVocabulary
from inference.engine.grammar import check_grammar
from inference.engine.sampling import make_generator, sample_rows
from inference.engine.telemetry import ExpertProbe, snapshot

__all__ = [
    "Chunk", "Engine", "EngineBusy", "EngineClosed", "EngineConfig", "PromptTooLong", "RequestHandle",
    "RequestState", "RequestStatus", "SamplingParams", "resolve_device",
]

log = logging.getLogger(__name__)


class Engine:
    """Serve one local model: a worker thread owns it and runs every admitted request in each step."""

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None, **settings) -> None:
        if config is not None and settings:
            raise TypeError("pass either an EngineConfig or keyword settings, not both")
        self.config = config or EngineConfig.from_kwargs(**settings)
        cfg = self.config
        SCHEDULERS[cfg.scheduler]  # an unknown scheduler fails before a slow load
        self.model_dir = Path(model_dir)
        self.device = resolve_device(cfg.device)
        threads = cfg.threads or (max(1, (os.cpu_count() or 2) // 2) if self.device == "cpu" else None)
        if threads:
            torch.set_num_threads(threads)
        config_path = self.model_dir / "config.json"
        if config_path.is_file():
            # Arithmetic on the config and the weight files' sizes: a config of millions of layers is refused
            # here, because once from_pretrained starts building it nothing can stop it.
            check_model_dir(self.model_dir, json.loads(config_path.read_text(encoding="utf-8")))
        self.tokenizer = load_tokenizer(self.model_dir)
        weight_files = sum(p.stat().st_size for p in self.model_dir.glob("*.safetensors"))
        self.precision = resolve_precision(cfg.precision, self.device, exact=cfg.exact, weight_file_bytes=weight_files)
        self.model = load_model(self.model_dir, self.device, self.precision)
        # Counted before the runner lays bf16 weights out for oneDNN, which makes them buffers.
        self.parameter_count = count_parameters(self.model)
        model_config = self.model.config
        self.context_length = int(getattr(model_config, "max_position_embeddings", 0) or self.tokenizer.model_max_length)
        self.eos_token_ids = eos_token_ids(self.model, self.tokenizer)
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.exact = cfg.exact
        self.runner = Runner.prepare(self.model, exact=self.exact)
        self.weight_bytes = weight_bytes(self.model)  # as prepared: packed weights replace the plain ones
        self.probe = ExpertProbe(self.model) if cfg.telemetry else None
        self.kv_bytes_per_token = self.runner.kv_bytes_per_token()
        if self.probe is not None:
            self.probe.discard_step()
        budget = cfg.kv_budget_bytes or auto_kv_budget(self.device)
        self.scheduler = SCHEDULERS[cfg.scheduler](
            queue_limit=cfg.queue_limit, kv_budget_bytes=budget, kv_bytes_per_token=self.kv_bytes_per_token,
            max_batch_size=cfg.max_batch_size, max_prefill_tokens=cfg.max_prefill_tokens,
            decoding_prefill_tokens=cfg.decoding_prefill_tokens, exact=self.exact,
            kv_headroom=cfg.kv_headroom,
            prefix_cache=PrefixCache(cfg.kv_block_tokens) if cfg.prefix_cache and not self.exact else None,
        )
        self.stats = EngineStats()
        self.router = OutputRouter(cfg.stream_interval_s)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"engine:{self.model_dir.name}", daemon=True)
        self._thread.start()
        log.info(
            "engine ready: %s on %s (%s weights, %s), context %d tokens, KV budget %.0f MiB (%d bytes/token)",
            self.model_dir, self.device, self.precision, "exact" if self.exact else "fast", self.context_length,
            budget / 2**20, self.kv_bytes_per_token,
        )

    # ---- asyncio side -------------------------------------------------------------------------

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Return the prompt ids for a chat, ending with the prompt for the assistant's turn (tools rendered
        by the chat template where it can)."""
        return encode_chat(self.tokenizer, messages, tools)

    def max_request_tokens(self) -> int:
        """Return the most tokens (prompt + max_tokens) one request may use: context and KV budget."""
        return min(self.context_length, self.scheduler.max_tokens_per_request())

    def submit(self, prompt_ids: Iterable[int], params: SamplingParams = SamplingParams(), *,
               cache_scope: str | None = None) -> RequestHandle:
        """Validate and queue a request from inside a running event loop; raise at once if it cannot run.

        A `params.grammar` (grammar.json_schema_grammar's text) constrains every sampled token to it; the
        request stops ("stop") as soon as the grammar is complete. `cache_scope` (plain data: a team's name)
        lets the request reuse the prompt KV that earlier requests of the same scope computed, and leave its
        own for later ones; requests of different scopes never share, and None (the default) neither reuses
        nor leaves anything.
        """
        if cache_scope is not None and not isinstance(cache_scope, str):
            raise TypeError(f"cache_scope must be a string or None, got {type(cache_scope).__name__}")
        if self._closed.is_set():
            raise EngineClosed("the engine is closed")
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        # Checked here because an out-of-range id on a GPU is a device-side assert that poisons the CUDA context.
        outside = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if outside is not None:
            raise ValueError(f"token id {outside} is outside the vocabulary [0, {self.vocab_size})")
        named_ids = [*(params.logit_bias or {}), *params.stop_token_ids]
        outside = next((t for t in named_ids if not 0 <= int(t) < self.vocab_size), None)
        if outside is not None:
            raise ValueError(f"token id {outside} (logit_bias or stop_token_ids) is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        if params.grammar is not None:
            check_grammar(params.grammar)  # a GrammarError (ValueError) names what cannot be enforced
        total = len(prompt_ids) + params.max_tokens
        if total > self.context_length:
            raise PromptTooLong(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the model's context length of {self.context_length} tokens"
            )
        if total > self.scheduler.max_tokens_per_request():
            raise PromptTooLong(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds this "
                f"deployment's KV-cache budget of {self.scheduler.max_tokens_per_request()} tokens"
            )
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Chunk] = asyncio.Queue()
        state = RequestState(prompt_ids, params, chunks.put_nowait, loop=loop, cache_scope=cache_scope)
        self.scheduler.add(state)
        return RequestHandle(state, chunks, self)

    async def stream(self, prompt_ids: Iterable[int], params: SamplingParams = SamplingParams(),
                     **options) -> AsyncIterator[Chunk]:
        """Submit a request (options as `submit`) and yield its chunks; closing the iterator early cancels it."""
        handle = self.submit(prompt_ids, params, **options)
        try:
            async for chunk in handle:
                yield chunk
        finally:
            handle.cancel()  # a no-op when the request already finished

    def cancel(self, state: RequestState) -> None:
        """Cancel a request: drop it from the queue, or flag it so the next step retires it."""
        if state.finished:
            return
        state.cancel_requested.set()
        if self.scheduler.discard(state):  # it never started, so the worker will never see it
            self._end_now(state, "cancelled")

    # ---- worker thread: the step loop -------------------------------------------------------------

    def _run(self) -> None:
        """Run steps until the engine closes, then fail whatever was still running."""
        with torch.inference_mode():
            while (plan := self.scheduler.schedule()) is not None:
                try:
                    self._step(plan)
                except Exception as exc:  # a bug outside the per-request guards must not kill the worker
                    log.exception("engine step failed")
                    for state in plan.requests:
                        if not state.finished:
                            self._retire(state, "error", f"{type(exc).__name__}: {exc}")
                    self.router.flush(force=True)
            for state in list(self.scheduler.running):
                self._retire(state, "error", "the engine was closed while the request was running")
            self.router.flush(force=True)

    def _step(self, plan: StepPlan) -> None:
        """Schedule → run → sample → postprocess, for every request of one step."""
        started = time.monotonic()
        for state in plan.cancelled:
            self._retire(state, "cancelled")
        scheduled = [(s, n) for s, n in plan.scheduled if not self._retire_if_cancelled(s)]
        admitted = set(plan.prefill)
        for state, _ in scheduled:
            if state in admitted:
                self._admit(state)
        if scheduled:
            batch = [s for s, _ in scheduled]
            new_tokens = [s.token_slice(s.num_computed, n) for s, n in scheduled]
            for state in batch:
                state.cache.max_capacity = max(state.cache.max_capacity, state.kv_tokens)
            rows = self._run_model(batch, new_tokens)
            # A prompt whose last chunk is still to come samples nothing: its row's logits are dropped.
            done, done_rows = [], []
            for state, row in zip(batch, rows):
                state.num_computed = state.cache.length
                if isinstance(row, Exception) or state.pending_tokens == 0:
                    done.append(state)
                    done_rows.append(row)
            prefilled = [s for s, n in scheduled if n > 1 and s.pending_tokens == 0]
            self._sample_and_postprocess(done, done_rows)
            for state in prefilled:
                if not state.finished:  # the prompt's blocks, for requests of its scope arriving meanwhile
                    self._store_prefix(state)
            self.stats.record_step(len(batch), sum(len(t) for t in new_tokens), time.monotonic() - started)
        self._flush()

    def _retire_if_cancelled(self, state: RequestState) -> bool:
        if state.cancel_requested.is_set():
            self._retire(state, "cancelled")
            return True
        return False

    def _admit(self, state: RequestState) -> None:
        """Give an admitted request its KV store (holding its cached prefix) and, the first time, its
        detokenizer and sampling state; a preempted request keeps those and recomputes only its KV."""
        resumed = state.preemptions > 0
        # Exact mode reserves the worst case; the buffers still start small and double within it.
        state.cache = KVStore(min(state.kv_tokens, state.num_tokens + 128), state.kv_tokens)
        blocks, state.prefix_blocks = state.prefix_blocks, []
        if blocks:
            state.cache.load_prefix([block.payload for block in blocks])
        if state.cache.length != state.num_computed:
            raise RuntimeError(f"the cached prefix holds {state.cache.length} tokens, the scheduler counted "
                               f"{state.num_computed}")
        if resumed:
            return
        params = state.params
        state.text = TextStream(self.tokenizer, state.prompt_ids, params.stop)
        if not params.greedy:
            state.generator = make_generator(params.seed, self.runner.output_device)
        if params.penalised:
            state.token_counts = torch.zeros(self.vocab_size, device=self.runner.output_device)

    def _run_model(self, batch: list[RequestState], new_tokens: list[list[int]]) -> list[torch.Tensor | Exception]:
        """Return each request's next-token logits [V], or the exception that request alone raised."""
        try:
            logits = self.runner.step([s.cache for s in batch], new_tokens)  # [R, V]
            if self.probe is not None:
                self.probe.end_step()
            return list(logits)
        except Exception as exc:
            if self.probe is not None:
                self.probe.discard_step()
            if len(batch) == 1:
                return [exc]
            self._after_failure()
        # The batch failed: run each request alone (uncommitted KV writes are simply overwritten) so that
        # only the request that fails on its own is failed. Exact batching makes the rows the same anyway.
        rows: list[torch.Tensor | Exception] = []
        for state, tokens in zip(batch, new_tokens):
            try:
                rows.append(self.runner.step([state.cache], [tokens])[0])
            except Exception as exc:
                rows.append(exc)
        if self.probe is not None:
            self.probe.discard_step()
        return rows

    def _sample_and_postprocess(self, batch: list[RequestState], rows: list[torch.Tensor | Exception]) -> None:
        ok = [(s, r) for s, r in zip(batch, rows) if not isinstance(r, Exception)]
        for state, row in zip(batch, rows):
            if isinstance(row, Exception):
                log.error("request %s failed: %s", state.request_id, row, exc_info=row)
                self._retire(state, "error", f"{type(row).__name__}: {row}")
        if not ok:
            return self._after_failure()
        masked = []
        for state, row in ok:
            try:
                masked.append((state, row, self._allowed_tokens(state)))
            except Exception as exc:  # a grammar that cannot go on ends its own request only
                log.exception("grammar of request %s failed", state.request_id)
                self._retire(state, "error", f"{type(exc).__name__}: {exc}")
        if not masked:
            return None
        states = [s for s, _, _ in masked]
        try:
            tokens = sample_rows(torch.stack([r for _, r, _ in masked]), [s.params for s in states],
                                 [s.generator for s in states], [s.token_counts for s in states],
                                 [m for _, _, m in masked])
        except Exception:  # one row's sampler failed (nan logits, say): sample the rows one by one
            tokens = []
            for state, row, mask in masked:
                try:
                    tokens.append(sample_rows(row[None], [state.params], [state.generator], [state.token_counts],
                                              [mask])[0])
                except Exception as exc:
                    log.exception("sampling for request %s failed", state.request_id)
                    tokens.append(exc)
        for (state, row, _), token in zip(masked, tokens):
            if isinstance(token, Exception):
                self._retire(state, "error", f"{type(token).__name__}: {token}")
                continue
            try:
                if state.params.logprobs is not None:
                    state.pending_logprobs.append(self._logprobs(row, token, state.params.logprobs))
                self._postprocess(state, token)
            except Exception as exc:  # a detokenizer failure ends this request only
                log.exception("postprocessing request %s failed", state.request_id)
                self._retire(state, "error", f"{type(exc).__name__}: {exc}")

    def _logprobs(self, row: torch.Tensor, token: int, alternatives: int) -> dict:
        """Return the log probability of `token` and of the `alternatives` most likely tokens, under the model's
        own distribution (before penalties, temperature and grammar), with each token's text."""
        logprobs = torch.log_softmax(row.float(), dim=-1)  # [V]
        top = logprobs.topk(alternatives) if alternatives else None
        text = self.tokenizer.decode
        return {"token": text([token]), "logprob": float(logprobs[token]),
                "top": [] if top is None else [[text([int(i)]), float(v)]
                                               for v, i in zip(top.values.tolist(), top.indices.tolist())]}

    def _allowed_tokens(self, state: RequestState) -> torch.Tensor | None:
        """Return the tokens the request may pick next (bool [V]), or None when any token may come.

        Its grammar's (compiled on first use), less the tokens that would end it too early: end-of-sequence
        and stop_token_ids before min_tokens, end-of-sequence always with ignore_eos.
        """
        params = state.params
        allowed = None
        if params.grammar is not None:
            if state.constraint is None:
                state.constraint = Constraint(self._grammar_vocabulary(), params.grammar)
            allowed = state.constraint.allowed()
        early = len(state.output_ids) < params.min_tokens
        banned = [*(self.eos_token_ids if early or params.ignore_eos else ()), *(params.stop_token_ids if early else ())]
        if banned:
            kept = torch.ones(self.vocab_size, dtype=torch.bool) if allowed is None else allowed.clone()
            kept[banned] = False
            if bool(kept.any()):  # a grammar that may only end now still ends: its JSON is whole
                allowed = kept
        return allowed

    def _grammar_vocabulary(self) -> GrammarVocabulary:
        """Return the vocabulary in the grammar library's terms, built on the first constrained request."""
        if self._vocabulary is None:
            self._vocabulary = GrammarVocabulary(self.tokenizer, self.vocab_size, self.eos_token_ids)
        return self._vocabulary

    _vocabulary: GrammarVocabulary | None = None

    def _postprocess(self, state: RequestState, token: int) -> None:
        """Record a sampled token, decide whether the request is done, and emit any new text."""
        state.output_ids.append(token)
        if state.constraint is not None:
            state.constraint.advance(token)
        if state.token_counts is not None:
            state.token_counts[token] += 1
        if token in self.eos_token_ids or token in state.params.stop_token_ids:
            text, _ = state.text.finish()  # the EOS token itself has no text; only held-back text remains
            return self._retire(state, "stop", text=text)
        text, stopped = state.text.push(token)
        if stopped:
            return self._retire(state, "stop", text=text)
        if state.constraint is not None and state.constraint.complete:  # the JSON value is closed: nothing may follow
            rest, _ = state.text.finish()
            return self._retire(state, "stop", text=text + rest)
        if len(state.output_ids) >= state.params.max_tokens:
            rest, stopped = state.text.finish()
            return self._retire(state, "stop" if stopped else "length", text=text + rest)
        if text:
            self._emit(state, state.chunk(text))

    def _store_prefix(self, state: RequestState) -> None:
        """Leave the request's computed full blocks in the prefix cache (a no-op without a scope)."""
        if state.cache is not None and state.cache.layers:
            self.scheduler.store_prefix(state, state.cache.copy_out)

    def _retire(self, state: RequestState, reason: str, error: str | None = None, *, text: str = "") -> None:
        """Finish a running request on the worker: free its KV reservation and queue its final chunk."""
        self.scheduler.finish(state)
        if reason != "error":  # an errored request's KV may be what failed; never hand it on
            self._store_prefix(state)  # after its reservation went back: the blocks may take that room
        state.finish(reason, error)
        self.stats.record_finish(state)
        self._emit(state, state.chunk(text))

    def _after_failure(self) -> None:
        if self.device == "cuda":
            torch.cuda.empty_cache()  # after an OOM, give the freed KV cache back before the next step

    # ---- results ------------------------------------------------------------------------------------

    def _emit(self, state: RequestState, chunk: Chunk) -> None:
        self.router.emit(state, chunk)

    def _flush(self) -> None:
        self.router.flush()

    def _end_now(self, state: RequestState, reason: str, error: str | None = None) -> None:
        """Finish a request that never ran (from any thread) and deliver its final chunk."""
        state.finish(reason, error)
        self.stats.record_finish(state)
        deliver_now(state, state.chunk(""))

    # ---- lifecycle and figures ----------------------------------------------------------------------

    def describe(self) -> dict:
        """Return the deployment's live figures: batch, queue, KV budget, counters."""
        return {
            "model": self.model_dir.name,
            "device": self.device,
            "exact": self.exact,
            "precision": self.precision,
            "weight_bytes": self.weight_bytes,
            "threads": torch.get_num_threads(),
            "running": len(self.scheduler.running),
            "waiting": self.scheduler.waiting_count,
            "kv_budget_bytes": self.scheduler.kv_budget_bytes,
            "kv_reserved_bytes": self.scheduler.kv_reserved_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            # The host memory of the process holding this engine (its engine process): weights on CPU, KV cache.
            "resident_bytes": psutil.Process().memory_info().rss,
            "max_prefill_tokens": self.scheduler.max_prefill_tokens,
            "decoding_prefill_tokens": self.scheduler.decoding_prefill_tokens,
            "chunked_prefill": not self.exact,
            "preemptions": self.scheduler.preemptions,
            "prefix_cache": self.scheduler.prefix_cache is not None,
            **(self.scheduler.prefix_cache.figures() if self.scheduler.prefix_cache is not None else {}),
            **self.stats.as_dict(),
        }

    def telemetry(self) -> dict:
        """Return the deployment's MoE routing telemetry (inference.engine.telemetry.snapshot)."""
        return snapshot(self)

    def close(self) -> None:
        """Stop the worker thread, fail requests still queued, and free the model and GPU memory."""
        if self._closed.is_set():
            return
        self._closed.set()
        for state in self.scheduler.close():
            self._end_now(state, "error", "the engine was closed before the request started")
        self._thread.join()
        self.model = self.runner = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

