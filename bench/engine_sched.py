"""Measure the scheduler's two latency levers on the demo models: chunked prefill and the prefix cache.

    .venv/bin/python bench/engine_sched.py                       # both, the three demo models
    .venv/bin/python bench/engine_sched.py --only itl --models demo-dense --rounds 5

itl: 15 streams decode (greedy, EOS ignored) while a long prompt (the longest the model's context takes
beside its 4 new tokens) is prefilled, `rounds` times. Reported: the 15 streams' inter-token latency
(p50/p95, ms, measured where a client reads them: between the chunks each stream receives, per token)
with no long prompt, and while it prefills, once with chunked prefill (the engine's default chunk while
others decode, or each of --budgets)
and once without (a chunk larger than the prompt: the whole prompt in one step, as before). Also
the long prompt's time to first token.

ttft: a chat with a shared system prompt of about 1,500 tokens, five turns of `--answer` tokens each; the
time to first token of turns 2..5 with the prefix cache on (the chat's requests share a cache scope) and
off. Each turn's prompt is the whole conversation so far, as a chat client sends it.

load: what the chunk costs a busy engine: `--clients` closed-loop clients (each sends its next short chat
as soon as its answer of 64 tokens ends) for `--rounds` answers each, with each chunk of --budgets and with
256; tokens/s and TTFT p50/p95.

Everything runs in this process against the engine itself (no HTTP), on CPU, in plain mode (exact mode
prefills whole and has no prefix cache). Writes nothing; not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.demo_models import DEMO_SPECS, make_demo_models  # noqa: E402
from inference.engine import Engine, EngineConfig, SamplingParams  # noqa: E402

FILLER = ("The ledger keeps every chat request as a digest in a hash chain; beat signs a checkpoint every few "
          "minutes, and an auditor verifies the bundle on any machine. ")
STREAMS = 15
ALONE_TOKENS = 6  # chunks each stream receives in a window without the long prompt


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def text_of_tokens(engine: Engine, tokens: int) -> list[int]:
    """Return a chat prompt of exactly `tokens` tokens (the filler cut to length)."""
    ids = engine.encode_chat([{"role": "user", "content": FILLER * (tokens // 20 + 1)}])
    return ids[:tokens]


async def decode_gaps(engine: Engine, long_prompt: list[int], rounds: int) -> dict:
    """Run 15 streams; return their per-token gaps (s) before and during each long prefill, and its TTFTs."""
    short = engine.encode_chat([{"role": "user", "content": "hi"}])
    arrivals: list[list[tuple[float, int]]] = [[] for _ in range(STREAMS)]
    params = SamplingParams(max_tokens=engine.context_length - len(short), temperature=0)
    handles = [engine.submit(short, params) for _ in range(STREAMS)]

    async def read(i: int) -> None:
        async for chunk in handles[i]:
            arrivals[i].append((time.perf_counter(), chunk.completion_tokens))

    readers = [asyncio.create_task(read(i)) for i in range(STREAMS)]
    while min(len(a) for a in arrivals) < 20:  # every stream is decoding, the first steps are behind us
        await asyncio.sleep(0.01)
    windows: list[tuple[str, float, float]] = []
    ttfts: list[float] = []
    for _ in range(rounds):
        # The window without the long prompt lasts ALONE_TOKENS chunks of every stream, not a fixed time: on
        # a loaded box one step of 15 streams can take longer than any fixed window, leaving it empty.
        started, marks = time.perf_counter(), [len(a) for a in arrivals]
        while min(len(a) - m for a, m in zip(arrivals, marks)) < ALONE_TOKENS:
            await asyncio.sleep(0.01)
        windows.append(("alone", started, time.perf_counter()))
        started = time.perf_counter()
        handle = engine.submit(long_prompt, SamplingParams(max_tokens=4, temperature=0))
        first = None
        async for chunk in handle:
            if first is None:
                first = time.perf_counter()
        windows.append(("prefill", started, first))
        ttfts.append(first - started)
    for handle in handles:
        handle.cancel()
    await asyncio.gather(*readers)
    gaps: dict[str, list[float]] = {"alone": [], "prefill": []}
    for stream in arrivals:
        for (t0, n0), (t1, n1) in zip(stream, stream[1:]):
            if n1 <= n0:
                continue
            for kind, start, end in windows:
                if start <= t0 and t1 <= end:
                    gaps[kind].extend([(t1 - t0) / (n1 - n0)] * (n1 - n0))
    return {"gaps": gaps, "ttft": ttfts}


def itl(model_dir: Path, rounds: int, budgets: list[int]) -> None:
    rows = {}
    configs = [("chunked", budget) for budget in budgets] + [("whole", 4096)]
    for label, step_tokens in configs:
        settings = {"device": "cpu", "stream_interval_s": 0.0, "prefix_cache": False}
        settings["decoding_prefill_tokens"] = step_tokens
        if label == "whole":  # the step's prompt budget too, or the prompt would still go in steps of 256
            settings["max_prefill_tokens"] = step_tokens
        with Engine(model_dir, **settings) as engine:
            engine.eos_token_ids = set()
            long_prompt = text_of_tokens(engine, engine.context_length - 4)
            budget = engine.describe()["decoding_prefill_tokens"]
            result = asyncio.run(decode_gaps(engine, long_prompt, rounds))
        rows[f"{label} (chunk {budget})"] = result
    print(f"\n{model_dir.name}: {STREAMS} decoding streams, a {len(long_prompt)}-token prompt prefilled {rounds}x "
          f"(context {engine.context_length})")
    print(f"  {'prefill':<40} {'ITL p50 ms':>10} {'ITL p95 ms':>10} {'p95 vs alone':>12} {'long TTFT ms':>12}")
    for name, result in rows.items():
        alone, during = result["gaps"]["alone"], result["gaps"]["prefill"]
        print(f"  {name + ', alone':<40} {1e3 * statistics.median(alone):>10.1f} {1e3 * percentile(alone, .95):>10.1f}")
        print(f"  {name + ', during':<40} {1e3 * statistics.median(during):>10.1f} {1e3 * percentile(during, .95):>10.1f}"
              f" {percentile(during, .95) / percentile(alone, .95):>11.2f}x {1e3 * statistics.median(result['ttft']):>12.0f}")


def ttft(model_dir: Path, answer: int, system_tokens: int) -> None:
    print(f"\n{model_dir.name}: a chat of 5 turns, ~{system_tokens}-token system prompt, {answer}-token answers")
    print(f"  {'prefix cache':<14} {'turn 1 ms':>10} {'turns 2..5 TTFT ms':>24} {'mean 2..5':>10} {'cached 2..5':>20}")
    figures = {}
    for cached in (False, True):
        with Engine(model_dir, device="cpu", prefix_cache=cached) as engine:
            engine.eos_token_ids = set()
            system = engine.tokenizer.decode(text_of_tokens(engine, system_tokens + 8)[8:])
            questions = ["What does the ledger keep?", "Who signs the checkpoints?", "How often?",
                         "What does an auditor need?", "And the console?"]

            async def chat() -> list[tuple[float, int, int]]:
                messages = [{"role": "system", "content": system}]
                turns = []
                for question in questions:
                    messages.append({"role": "user", "content": question})
                    prompt = engine.encode_chat(messages)
                    started = time.perf_counter()
                    handle = engine.submit(prompt, SamplingParams(max_tokens=answer, temperature=0),
                                           cache_scope="bench-team")
                    first, text, cached_tokens = None, [], 0
                    async for chunk in handle:
                        if first is None and chunk.completion_tokens:
                            first = time.perf_counter()
                        text.append(chunk.text)
                        cached_tokens = chunk.cached_tokens
                    turns.append((first - started, len(prompt), cached_tokens))
                    messages.append({"role": "assistant", "content": "".join(text)})
                return turns

            turns = asyncio.run(chat())
        later = [t for t, _, _ in turns[1:]]
        figures[cached] = statistics.mean(later)
        print(f"  {'on' if cached else 'off':<14} {1e3 * turns[0][0]:>10.0f} "
              f"{' '.join(f'{1e3 * t:.0f}' for t in later):>24} {1e3 * figures[cached]:>10.0f} "
              f"{' '.join(f'{c}/{p}' for _, p, c in turns[1:]):>20}")
    print(f"  turns 2..5 with the cache take {figures[True] / figures[False]:.2f}x the time without")


async def closed_loop(engine: Engine, clients: int, rounds: int) -> tuple[float, list[float]]:
    """Return tokens/s and every TTFT of `clients` clients sending `rounds` requests each, one after another."""
    ttfts: list[float] = []
    tokens = 0

    async def client(i: int) -> None:
        nonlocal tokens
        for r in range(rounds):
            prompt = engine.encode_chat([{"role": "user", "content": f"Question {i}.{r}: " + FILLER[: 40 + 7 * i]}])
            started, first = time.perf_counter(), None
            async for chunk in engine.submit(prompt, SamplingParams(max_tokens=64, temperature=0)):
                if first is None and chunk.completion_tokens:
                    first = time.perf_counter()
                    ttfts.append(first - started)
                if chunk.finish_reason:
                    tokens += chunk.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return tokens / (time.perf_counter() - started), ttfts


def load(model_dir: Path, clients: int, rounds: int, budgets: list[int]) -> None:
    print(f"\n{model_dir.name}: {clients} closed-loop clients x {rounds} answers of 64 tokens")
    print(f"  {'chunk while decoding':<22} {'tok/s':>8} {'TTFT p50 ms':>12} {'TTFT p95 ms':>12}")
    for budget in [*budgets, 256]:
        with Engine(model_dir, device="cpu", decoding_prefill_tokens=budget) as engine:
            engine.eos_token_ids = set()
            rate, ttfts = asyncio.run(closed_loop(engine, clients, rounds))
        print(f"  {budget:<22} {rate:>8.0f} {1e3 * statistics.median(ttfts):>12.0f} {1e3 * percentile(ttfts, .95):>12.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEMO_SPECS), choices=list(DEMO_SPECS))
    parser.add_argument("--only", choices=("itl", "ttft", "load"))
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64], help="clients of the load run")
    parser.add_argument("--rounds", type=int, default=3, help="long prompts per ITL run")
    parser.add_argument("--budgets", type=int, nargs="+", default=[EngineConfig().decoding_prefill_tokens],
                        help="prompt tokens per step while others decode, to run chunked prefill with "
                             "(default: the engine's default)")
    parser.add_argument("--answer", type=int, default=32, help="tokens per chat answer")
    parser.add_argument("--system-tokens", type=int, default=1500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_demo_models(Path(tmp))
        for name in args.models:
            if args.only in (None, "itl"):
                itl(Path(tmp) / name, args.rounds, args.budgets)
            if args.only in (None, "ttft"):
                ttft(Path(tmp) / name, args.answer, args.system_tokens)
            if args.only in (None, "load"):
                for clients in args.clients:
                    load(Path(tmp) / name, clients, args.rounds, args.budgets)


if __name__ == "__main__":
    main()
