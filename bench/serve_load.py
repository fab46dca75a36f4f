"""The load of bench/serve.py: closed-loop streaming clients over httpx, and the in-process baselines.

A level of C clients is closed-loop: each client sends `rounds` chat requests back to back (at least
MIN_REQUESTS in all), each streaming `max_tokens` greedy tokens. So the first round arrives as a burst and
later ones arrive as earlier answers finish; TTFT percentiles cover all requests, and the burst's own p50
is reported beside them. Tokens are counted from the `usage` the server reports, never from chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

MIN_REQUESTS = 8
# torch's own thread count, taken before any Engine in this process sets its own (half the cores): the
# baselines of every model run with it, whichever model's engine ran before.
DEFAULT_THREADS = torch.get_num_threads()
TOPICS = [
    "the audit ledger", "expert routing", "the egress guard", "signed checkpoints", "team quotas",
    "the model store", "KV caches", "distilled models", "the reconciler", "network attestations",
    "prefill and decode", "the admin console", "Merkle trees", "dense models", "batching", "the fit advisor",
]


def chat_messages(i: int) -> list[dict]:
    """Return request i's chat: mixed lengths, the same for every server."""
    topic = TOPICS[i % len(TOPICS)]
    return [{"role": "user", "content": f"Explain {topic}" + ", and why it matters" * (i % 4) + "."}]


@dataclass
class Sample:
    """One request as a client saw it."""

    index: int = 0  # order of sending; the first C of a level are its opening burst
    ttft: float | None = None  # seconds from send to the first content
    gaps: list[float] = field(default_factory=list)  # seconds between content chunks
    completion_tokens: int = 0  # from usage
    error: str | None = None
    sent: float = field(default_factory=time.perf_counter)
    last: float = 0.0

    def saw_text(self) -> None:
        """Record that content arrived now: the first time as TTFT, after that as an inter-token gap."""
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.sent
        else:
            self.gaps.append(now - self.last)
        self.last = now


async def one_request(client: httpx.AsyncClient, url: str, headers: dict, model: str, i: int,
                      max_tokens: int, extra: dict | None = None) -> Sample:
    """Stream one chat completion and time it. `extra`: the server's own fields that make it generate exactly
    max_tokens (ignore_eos, min_tokens), where it has them."""
    body = {"model": model, "messages": chat_messages(i), "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    sample = Sample(index=i)
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                sample.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return sample
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    sample.error = f"in-stream error: {str(event['error'])[:200]}"
                    return sample
                if event.get("usage"):
                    sample.completion_tokens = event["usage"]["completion_tokens"]
                if any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                    sample.saw_text()
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"
    if sample.error is None and sample.completion_tokens == 0:
        sample.error = "no tokens (status 200, empty answer)"
    return sample


async def drive(url: str, headers: dict, model: str, clients: int, max_tokens: int, rounds: int = 1,
                extra: dict | None = None, min_requests: int = MIN_REQUESTS) -> dict:
    """Run one concurrency level and return its figures."""
    total = max(clients * rounds, min_requests)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                samples.append(await one_request(client, url, headers, model, queue.get_nowait(), max_tokens, extra))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    return summarize(samples, wall, clients, max_tokens)


def summarize(samples: list[Sample], wall: float, clients: int, max_tokens: int | None = None) -> dict:
    ok = [s for s in samples if s.error is None]
    ttfts = sorted(s.ttft for s in ok if s.ttft is not None)
    burst = sorted(s.ttft for s in ok if s.ttft is not None and s.index < clients)
    gaps = sorted(g for s in ok for g in s.gaps)
    tokens = sum(s.completion_tokens for s in ok)
    return {
        "clients": clients,
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "error_examples": sorted({s.error for s in samples if s.error})[:3],
        "completion_tokens": tokens,
        # Answers whose usage.completion_tokens is not exactly max_tokens (a server that stopped at EOS).
        "not_full_length": sum(1 for s in ok if max_tokens is not None and s.completion_tokens != max_tokens),
        "seconds": wall,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "ttft_p50_ms": 1e3 * _quantile(ttfts, 0.5),
        "ttft_p95_ms": 1e3 * _quantile(ttfts, 0.95),
        "ttft_burst_p50_ms": 1e3 * _quantile(burst, 0.5),
        "itl_p50_ms": 1e3 * _quantile(gaps, 0.5),
    }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q * 100) - 1))]


def warm_up(url: str, headers: dict, model: str) -> None:
    """Send a few requests so lazy setup (transformers' batching manager) is not measured."""
    asyncio.run(drive(url, headers, model, clients=4, max_tokens=8))


def in_process_baselines(model_dir, max_tokens: int, prompts: int = 16, repeats: int = 3) -> dict:
    """Return the static-batch ceiling (one generate over the prompts) and the sequential figure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template(chat_messages(i), add_generation_prompt=True, tokenize=False)
             for i in range(prompts)]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    eos = set(model.generation_config.eos_token_id or [])

    def generated(rows: torch.Tensor) -> int:
        count = 0
        for row in rows.tolist():
            for token in row:
                count += 1
                if token in eos:
                    break
        return count

    # Best of `repeats`: a ceiling should not be lowered by another process's burst on a shared box.
    static_s = seq_s = float("inf")
    torch.set_num_threads(DEFAULT_THREADS)
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=8, do_sample=False)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False)
            static_s = min(static_s, time.perf_counter() - started)
            static_tokens = generated(out[:, batch["input_ids"].shape[1]:])
        for _ in range(repeats):
            seq_tokens, started = 0, time.perf_counter()
            for text in texts:
                ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
                out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
                seq_tokens += generated(out[:, ids["input_ids"].shape[1]:])
            seq_s = min(seq_s, time.perf_counter() - started)
    return {
        "threads": DEFAULT_THREADS,
        "static_batch": {"prompts": prompts, "completion_tokens": static_tokens, "seconds": static_s,
                         "tokens_per_s": static_tokens / static_s},
        "sequential": {"prompts": prompts, "completion_tokens": seq_tokens, "seconds": seq_s,
                       "tokens_per_s": seq_tokens / seq_s},
    }


def engine_in_process(model_dir, levels: list[int], max_tokens: int, exact: bool | None = None) -> list[dict]:
    """Return tokens/s and TTFT of the appliance's engine alone (no HTTP), at each concurrency level."""
    from transformers import AutoTokenizer

    from inference.engine import Engine, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    def prompt(i: int) -> list[int]:
        text = tokenizer.apply_chat_template(chat_messages(i), add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    async def level(engine: Engine, clients: int) -> dict:
        async def one(i: int) -> Sample:
            sample = Sample(index=i)
            async for chunk in engine.submit(
                    prompt(i), SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)):
                if chunk.text:
                    sample.saw_text()
                sample.completion_tokens = chunk.completion_tokens
            return sample

        started = time.perf_counter()
        samples = await asyncio.gather(*(one(i) for i in range(clients)))
        return summarize(list(samples), time.perf_counter() - started, clients, max_tokens)

    with Engine(model_dir, device="cpu", stream_interval_s=0.0, exact=exact) as engine:
        asyncio.run(level(engine, 4))  # warm-up
        return [asyncio.run(level(engine, clients)) for clients in levels]


def path_comparison_arguments(description: str, argv: list[str] | None, out: Path) -> argparse.Namespace:
    """Parse the options of a comparison of paths to one model: client counts, tokens, rounds, where to write."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=out)
    return parser.parse_args(argv)


def compare_paths(paths: dict[str, tuple[str, dict]], model: str, levels: list[int], max_tokens: int, rounds: int,
                  extra: dict | None = None) -> list[dict]:
    """Drive each path (name -> (URL, headers)) at each client count, the paths alternated per level so that drift
    hits them alike; print each row as it comes and return the rows."""
    for url, headers in paths.values():
        warm_up(url, headers, model)
    rows = []
    for clients in levels:
        for name, (url, headers) in paths.items():
            row = asyncio.run(drive(url, headers, model, clients, max_tokens, rounds, extra))
            rows.append({"path": name, **row})
            print(f"{name:30s} {clients:3d} clients  {row['tokens_per_s']:8.1f} tok/s  "
                  f"TTFT p50 {row['ttft_p50_ms']:7.1f} ms  ITL p50 {row['itl_p50_ms']:6.1f} ms  "
                  f"errors {row['errors']}", flush=True)
    return rows


def write_report(out: Path, prefix: str, report: dict) -> Path:
    """Write a benchmark's figures as JSON under out, named by prefix and the time; return the file."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return path
