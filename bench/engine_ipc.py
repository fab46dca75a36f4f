"""Measure what the process split costs or gains: the same engine in this process and in an engine process.

    .venv/bin/python bench/engine_ipc.py [--model demo-dense] [--clients 1 16 64] [--max-tokens 64] [--repeats 3]

Runs the same greedy load (C concurrent requests × N tokens, the same prompts, so both generate the same
tokens) against an in-process `Engine` and against an `EngineClient` (the engine in a child process, over
the socketpair), alternating, and prints the median tokens/s of each, their ratio, the round trip of a
submission (submit → accepted) on the wire, and how long a SIGKILLed engine process takes to be seen gone and
to answer again from a new process. No HTTP here: bench/serve.py measures the whole web process.
Writes bench/out/engine-ipc-<time>.json. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HOME = Path(tempfile.mkdtemp(prefix="bench-ipc-"))
os.environ.setdefault("APPLIANCE_HOME", str(HOME))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")

import django  # noqa: E402

django.setup()

from appliance import engine_client  # noqa: E402
from inference.demo_models import make_demo_models  # noqa: E402
from inference.engine import Engine, EngineConfig, SamplingParams  # noqa: E402


async def load(engine, clients: int, max_tokens: int) -> float:
    """Return tokens/s for `clients` concurrent greedy requests."""
    prompts = [engine.encode_chat([{"role": "user", "content": f"Explain topic {i}" + " and more" * (i % 5)}])
               for i in range(clients)]

    async def one(prompt: list[int]) -> int:
        handle = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
        await handle.accepted()
        return [c async for c in handle][-1].completion_tokens

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
    return tokens / (time.perf_counter() - started)


async def round_trips(client, count: int) -> list[float]:
    """Return the seconds from submit to accepted, one request at a time (each then cancelled)."""
    prompt = client.encode_chat([{"role": "user", "content": "hi"}])
    out = []
    for _ in range(count):
        started = time.perf_counter()
        handle = client.submit(prompt, SamplingParams(max_tokens=1))
        await handle.accepted()
        out.append(time.perf_counter() - started)
        [c async for c in handle]
    return out


def kill_and_restart(client, model_dir: Path, config: EngineConfig) -> dict:
    """SIGKILL the engine process; return when its exit was seen and when a new one answered a request."""
    killed = time.perf_counter()
    os.kill(client.pid, signal.SIGKILL)
    while client.alive:
        time.sleep(0.001)
    seen = time.perf_counter()
    fresh = engine_client.start_engine(client.name, model_dir, config)
    asyncio.run(load(fresh, 1, 1))
    back = time.perf_counter()
    fresh.close()
    return {"exit_seen_s": seen - killed, "back_s": back - killed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo-dense")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    model_dir = make_demo_models(HOME / "models", names=[args.model])[0]
    config = EngineConfig(device="cpu")
    engines = {"in-process": Engine(model_dir, config),
               "engine process": engine_client.start_engine(args.model, model_dir, config)}
    for engine in engines.values():
        asyncio.run(load(engine, 4, 8))  # warm-up
    figures = {key: {c: [] for c in args.clients} for key in engines}
    for _ in range(args.repeats):
        for clients in args.clients:
            for key, engine in engines.items():
                figures[key][clients].append(asyncio.run(load(engine, clients, args.max_tokens)))
    trips = asyncio.run(round_trips(engines["engine process"], 50))
    restart = kill_and_restart(engines["engine process"], model_dir, config)
    for engine in engines.values():
        engine.close()
    print(f"{args.model}, greedy, {args.max_tokens} tokens per request, median of {args.repeats} (tokens/s):")
    summary = {}
    for clients in args.clients:
        inside = statistics.median(figures["in-process"][clients])
        child = statistics.median(figures["engine process"][clients])
        summary[clients] = {"in_process": inside, "engine_process": child, "ratio": child / inside}
        print(f"  {clients:3d} clients: in-process {inside:8.1f}   engine process {child:8.1f}   "
              f"ratio {child / inside:5.2f}")
    print(f"  SIGKILL -> exit seen in {restart['exit_seen_s'] * 1000:.0f} ms; a new engine process answering "
          f"{restart['back_s']:.1f} s after the kill (what the reconciler does on the exit)")
    trips_ms = sorted(t * 1000 for t in trips)
    print(f"  submit -> accepted round trip: p50 {trips_ms[len(trips_ms) // 2]:.2f} ms, "
          f"p95 {trips_ms[int(len(trips_ms) * 0.95)]:.2f} ms (50 requests)")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine-ipc-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"model": args.model, "max_tokens": args.max_tokens, "tokens_per_s": figures,
                                "summary": summary, "round_trip_ms": trips_ms,
                                "restart": restart}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
