"""Weight precision on this CPU: decode and prefill speed of the engine in float32, bfloat16 and int8
weight-only, and greedy agreement of each with float32.

    .venv/bin/python bench/precision.py                                   # demos + real-shape models
    .venv/bin/python bench/precision.py --models demo-moe --threads 1 --precisions float32 int8
    .venv/bin/python bench/precision.py --models /path/to/a/real/model --clients 1 --prompts 32

The engine is driven in process (no HTTP) with its torch threads fixed (--threads) and the process bound to
that many cores, so the figures compare formats, not the scheduler's luck. Each figure is the best of
--repeats, because the box may be shared. Decode: `clients` requests of --tokens tokens each, EOS switched off
so every request runs its full length. Prefill: one --prefill-tokens prompt with max_tokens 1 (its TTFT).
Agreement: --prompts chat prompts answered greedily (--agree-tokens tokens) in each format, against float32:
how many answers are identical, and the mean share of tokens before the first difference. On random-weight
models near-ties are common, so the agreement there is a lower bound of what real weights give.
Writes bench/out/precision-<time>.json. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.serve_load import chat_messages  # noqa: E402
from bench.shapes import DEFAULT_OUT as SHAPES_DIR, write_shape  # noqa: E402
from inference.demo_models import DEMO_SPECS, make_demo_models  # noqa: E402
from inference.engine import Engine, SamplingParams  # noqa: E402
from inference.engine.precision import cpu_has_native_bf16, resolve_precision  # noqa: E402

DEMO_DIR = Path(tempfile.mkdtemp(prefix="bench-precision-"))
DEFAULT_MODELS = [*DEMO_SPECS, "qwen2_5-0_5b-shape", "deepseek-v3-shape"]


def model_dir(name: str) -> Path:
    """A demo, a real-shape model, or the path of any local model directory (a real model, for agreement)."""
    if Path(name).is_dir():
        return Path(name)
    if name in DEMO_SPECS:  # written anew each run (seconds): a kept copy could be of an older demo
        return make_demo_models(DEMO_DIR, names=[name])[0]
    return write_shape(name, SHAPES_DIR)


async def _run(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, float, list[list[int]]]:
    """Run the prompts together; return seconds to the first chunk of the first, seconds in all, output ids."""
    started = time.perf_counter()
    first: list[float] = []

    async def one(prompt: list[int]) -> list[int]:
        handle = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
        async for _ in handle:
            if not first:
                first.append(time.perf_counter() - started)
        return list(handle.state.output_ids)

    outputs = await asyncio.gather(*(one(p) for p in prompts))
    return first[0], time.perf_counter() - started, outputs


def measure(path: Path, precision: str, args) -> dict:
    with Engine(path, device="cpu", precision=precision, threads=args.threads, telemetry=False,
                stream_interval_s=0.0, max_prefill_tokens=max(256, args.prefill_tokens)) as engine:
        chats = [engine.encode_chat(chat_messages(i)) for i in range(max(args.prompts, max(args.clients)))]
        answers = [asyncio.run(_run(engine, [c], args.agree_tokens))[2][0] for c in chats[:args.prompts]]
        engine.eos_token_ids = set()  # every decode request runs its full length
        asyncio.run(_run(engine, chats[:2], 4))  # warm-up
        row = {"precision": precision, "weight_bytes": engine.describe()["weight_bytes"],
               "threads": torch.get_num_threads(), "decode": {}, "answers": answers}
        for clients in args.clients:
            best = min(asyncio.run(_run(engine, chats[:clients], args.tokens))[1] for _ in range(args.repeats))
            row["decode"][clients] = clients * args.tokens / best
        long_prompt = (chats[0] * (args.prefill_tokens // len(chats[0]) + 1))[:args.prefill_tokens]
        best = min(asyncio.run(_run(engine, [long_prompt], 1))[0] for _ in range(args.repeats))
        row["prefill_tokens_per_s"] = args.prefill_tokens / best
    return row


def agreement(reference: list[list[int]], answers: list[list[int]]) -> dict:
    same = sum(a == b for a, b in zip(reference, answers))
    prefix = []
    for a, b in zip(reference, answers):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(1, len(a)))
    return {"identical": same, "of": len(reference), "mean_prefix_share": sum(prefix) / len(prefix)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16", "int8"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--agree-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):  # the torch threads stay on as many cores as they are
        cores = sorted(os.sched_getaffinity(0))[:args.threads]
        os.sched_setaffinity(0, cores)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "native_bf16": cpu_has_native_bf16(),
                          "auto": resolve_precision("auto", "cpu", exact=False), "load_before": os.getloadavg()},
              "models": {}}
    print(f"native bf16: {report['machine']['native_bf16']}; auto picks {report['machine']['auto']} for models "
          "of 128 MiB of weights or more, float32 below", flush=True)
    header = f"{'model':<20} {'precision':<9} {'MB':>7} " + " ".join(f"{f'decode@{c}':>10}" for c in args.clients)
    print(header + f" {'prefill':>9} {'same/of':>8} {'prefix':>6}", flush=True)
    for name in args.models:
        path = model_dir(name)
        name = path.name
        rows = [measure(path, p, args) for p in args.precisions]
        reference = next((r["answers"] for r in rows if r["precision"] == "float32"), rows[0]["answers"])
        for row in rows:
            row["agreement_with_float32"] = agreement(reference, row.pop("answers"))
            a = row["agreement_with_float32"]
            print(f"{name:<20} {row['precision']:<9} {row['weight_bytes'] / 2**20:7.1f} "
                  + " ".join(f"{row['decode'][c]:10.1f}" for c in args.clients)
                  + f" {row['prefill_tokens_per_s']:9.0f} {a['identical']:>3}/{a['of']:<4} {a['mean_prefix_share']:6.2f}",
                  flush=True)
        report["models"][name] = rows
    report["machine"]["load_after"] = os.getloadavg()
    out = ROOT / "bench" / "out" / f"precision-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"decode and prefill in tokens/s (best of {args.repeats}); wrote {out}")


if __name__ == "__main__":
    main()
