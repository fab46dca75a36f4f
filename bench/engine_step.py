"""Time one batched decode step of the engine's runner, exact and plain, against generate's own step.

    .venv/bin/python bench/engine_step.py                  # the three demo models, 16 rows
    .venv/bin/python bench/engine_step.py --rows 1 16 --threads 1

For each demo model: the runner's decode step over `rows` requests (each with its own prompt and KV store,
as the engine runs them) in exact mode (bit-exact with unbatched generate, the CPU default) and plain mode
(one batched product per layer), and generate's per-token time for the same prompts padded into one batch.
Best of three rounds of `steps` steps each, so another process's burst does not set the figure.
Writes nothing; not part of `make test`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from bench.serve_load import chat_messages  # noqa: E402
from inference.demo_models import DEMO_SPECS, make_demo_models  # noqa: E402
from inference.engine.cache import KVStore  # noqa: E402
from inference.engine.runner import Runner, load_model  # noqa: E402


def chat_texts(tokenizer, rows: int) -> list[str]:
    """Return the benchmark's first `rows` chats as prompt text, ready for the assistant's turn."""
    return [tokenizer.apply_chat_template(chat_messages(i), add_generation_prompt=True, tokenize=False)
            for i in range(rows)]


def prompts(model_dir: Path, rows: int) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in chat_texts(tokenizer, rows)]


def runner_step_ms(model_dir: Path, rows: int, exact: bool, steps: int) -> float:
    """Return the best mean time of a decode step over `rows` requests, in ms."""
    runner = Runner.prepare(load_model(model_dir, "cpu"), exact=exact)
    ids = prompts(model_dir, rows)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            stores = [KVStore(len(p) + steps + 1, len(p) + steps + 1) for p in ids]
            tokens = runner.step(stores, ids).argmax(-1).tolist()
            started = time.perf_counter()
            for _ in range(steps):
                tokens = runner.step(stores, [[t] for t in tokens]).argmax(-1).tolist()
            best = min(best, (time.perf_counter() - started) / steps)
    return 1e3 * best


def generate_step_ms(model_dir: Path, rows: int, steps: int) -> float:
    """Return generate's best time per new token over the same prompts padded into one batch, in ms."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.padding_side = "left"
    model = load_model(model_dir, "cpu")
    batch = tokenizer(chat_texts(tokenizer, rows), add_special_tokens=False, padding=True, return_tensors="pt")
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            one = time.perf_counter()
            model.generate(**batch, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            prefill = time.perf_counter() - one
            started = time.perf_counter()
            model.generate(**batch, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False)
            best = min(best, (time.perf_counter() - started - prefill) / steps)
    return 1e3 * best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEMO_SPECS), choices=list(DEMO_SPECS))
    parser.add_argument("--rows", nargs="+", type=int, default=[16])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the engine's default on 2 cores: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="engine-step-") as tmp:
        make_demo_models(Path(tmp), names=args.models)
        print(f"{'model':<15} {'rows':>4} {'exact ms':>9} {'plain ms':>9} {'generate ms':>12}  (per decode step)")
        for name in args.models:
            model_dir = Path(tmp) / name
            for rows in args.rows:
                exact = runner_step_ms(model_dir, rows, True, args.steps)
                plain = runner_step_ms(model_dir, rows, False, args.steps)
                generated = generate_step_ms(model_dir, rows, args.steps)
                print(f"{name:<15} {rows:>4} {exact:9.2f} {plain:9.2f} {generated:12.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
