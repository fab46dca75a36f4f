"""The cost of grammars in a shared batch: 16 concurrent clients on one engine, none or half constrained.

    .venv/bin/python bench/grammar_throughput.py                       # demo-dense, 16 clients, 3 rounds
    .venv/bin/python bench/grammar_throughput.py --model demo-moe --clients 16 --tokens 48

Each client asks for `tokens` tokens with ignore-free sampling (temperature 1, its own seed). Round kinds:
`free` (no client constrained) and `half` (every other client holds a JSON schema with bounded fields).
Reports generated tokens per second (best of `rounds`, so another process's burst does not set the
figure), the mean batch size, and the grammar mask's cost per constrained token. Writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.demo_models import make_demo_models  # noqa: E402
from inference.engine import Engine, SamplingParams  # noqa: E402
from inference.engine.grammar import json_schema_grammar  # noqa: E402

SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["name", "level", "tags"],
    "properties": {"name": {"type": "string", "maxLength": 24},
                   "level": {"type": "integer", "minimum": 1, "maximum": 5},
                   "colour": {"enum": ["red", "green", "blue"]},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4}},
}


async def client(engine: Engine, prompt: list[int], params: SamplingParams) -> int:
    tokens = 0
    async for chunk in engine.stream(prompt, params):
        tokens = chunk.completion_tokens
    return tokens


async def round_(engine: Engine, clients: int, tokens: int, constrained_share: int, grammar: str) -> dict:
    prompt = engine.tokenizer("Describe the audit ledger of the box.")["input_ids"]
    before = engine.describe()
    started = time.perf_counter()
    counts = await asyncio.gather(*[client(engine, prompt, SamplingParams(
        max_tokens=tokens, temperature=1.0, seed=i,
        grammar=grammar if constrained_share and i % constrained_share == 0 else None)) for i in range(clients)])
    seconds = time.perf_counter() - started
    after = engine.describe()
    steps = after["steps"] - before["steps"]
    return {"tokens": sum(counts), "seconds": seconds, "tokens_per_s": sum(counts) / seconds,
            "steps": steps, "mean_batch": sum(counts) / steps if steps else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-dense")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_demo_models(Path(tmp), names=[args.model])[0]
        engine = Engine(model_dir, device="cpu")
        grammar = json_schema_grammar(SCHEMA)
        try:
            asyncio.run(round_(engine, 2, 8, 2, grammar))  # warm-up: first steps, the grammar vocabulary
            for kind, share in (("free", 0), ("half", 2)):
                best = max((asyncio.run(round_(engine, args.clients, args.tokens, share, grammar))
                            for _ in range(args.rounds)), key=lambda r: r["tokens_per_s"])
                print(f"{args.model} {kind:4s} clients={args.clients}: {best['tokens']} tokens in "
                      f"{best['seconds']:.2f} s = {best['tokens_per_s']:.0f} tokens/s, "
                      f"{best['steps']} steps, mean batch {best['mean_batch']:.1f}")
        finally:
            engine.close()


if __name__ == "__main__":
    main()
