"""Measure what the MoE telemetry (router counts per step) costs the engine, in process, without HTTP.

    .venv/bin/python bench/engine_overhead.py [--model demo-moe] [--clients 16] [--repeats 5]

Runs the same load (C concurrent requests × 64 greedy tokens) against two engines on the same model, one
with telemetry and one without, alternating, and prints the median tokens/s of each and the difference.
Writes bench/out/engine-overhead-<time>.json. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.demo_models import make_demo_models  # noqa: E402
from inference.engine import Engine, SamplingParams  # noqa: E402


async def load(engine: Engine, clients: int, max_tokens: int) -> float:
    """Return tokens/s for `clients` concurrent greedy requests."""
    prompts = [engine.encode_chat([{"role": "user", "content": f"Explain topic {i}" + " and more" * (i % 5)}])
               for i in range(clients)]

    async def one(prompt: list[int]) -> int:
        handle = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
        return [c async for c in handle][-1].completion_tokens

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
    return tokens / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo-moe")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    model_dir = make_demo_models(Path(tempfile.mkdtemp(prefix="bench-engine-")), names=[args.model])[0]
    engines = {"on": Engine(model_dir, device="cpu", telemetry=True),
               "off": Engine(model_dir, device="cpu", telemetry=False)}
    for engine in engines.values():
        engine.eos_token_ids = set()  # every request runs its full max_tokens
        asyncio.run(load(engine, 4, 8))  # warm-up
    figures: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(args.repeats):
        for key, engine in engines.items():
            figures[key].append(asyncio.run(load(engine, args.clients, args.max_tokens)))
    for engine in engines.values():
        engine.close()
    on, off = statistics.median(figures["on"]), statistics.median(figures["off"])
    cost = 1 - on / off
    print(f"{args.model}, {args.clients} clients x {args.max_tokens} tokens, median of {args.repeats}:")
    print(f"  telemetry off: {off:8.1f} tok/s   on: {on:8.1f} tok/s   cost: {100 * cost:+.1f}%")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine-overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"model": args.model, "clients": args.clients, "max_tokens": args.max_tokens,
                                "tokens_per_s": figures, "median_on": on, "median_off": off, "cost": cost}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
