"""Where a decode step of a real-shape model spends its time: the runner's plain step over `rows` requests,
timed at each torch thread count, and torch's profiler table of the decode steps' ops at the last one.

    .venv/bin/python bench/step_profile.py                                    # both real-shape models
    .venv/bin/python bench/step_profile.py --models deepseek-v3-shape --rows 1 8 --threads 1 2 --precision int8
    .venv/bin/python bench/step_profile.py --models demo-dense demo-moe --rows 1 8 16 --top 0
    .venv/bin/python bench/step_profile.py --precision bfloat16 --threads 1 --top 0 --unpacked   # bf16 weights unpacked
    .venv/bin/python bench/step_profile.py --models demo-moe deepseek-v3-shape --rows 1 16 64 --top 0 --expanded-mla
    .venv/bin/python bench/step_profile.py --models demo-dense demo-distilled --rows 1 16 64 --top 0 --stock-forward

Each figure is the best mean of three rounds of --steps decode steps (the box may be shared), after a
prefill of the benchmark's chat prompts. The table lists the ops by their own CPU time (self time), so
the share of arithmetic (mm, grouped_mm, SDPA) against dispatch and small ops is read off directly.
Writes nothing; not part of `make test`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.engine_step import prompts  # noqa: E402
from bench.precision import model_dir as find_model  # noqa: E402
from inference.engine.cache import KVStore  # noqa: E402
from inference.engine import runner as runner_module  # noqa: E402
from inference.engine.runner import Runner, load_model  # noqa: E402


def prefill(runner: Runner, ids: list[list[int]], steps: int) -> tuple[list[KVStore], list[int]]:
    """Prefill `ids` into stores with room for `steps` more tokens; return them and the first tokens."""
    stores = [KVStore(len(p) + steps + 1, len(p) + steps + 1) for p in ids]
    return stores, runner.step(stores, ids).argmax(-1).tolist()


def decode_steps(runner: Runner, stores: list[KVStore], tokens: list[int], steps: int) -> float:
    """Run `steps` decode steps after a prefill; return the mean seconds of one."""
    started = time.perf_counter()
    for _ in range(steps):
        tokens = runner.step(stores, [[t] for t in tokens]).argmax(-1).tolist()
    return (time.perf_counter() - started) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["qwen2_5-0_5b-shape", "deepseek-v3-shape"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "int8"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=14, help="rows of the profiler table")
    parser.add_argument("--unpacked", action="store_true",
                        help="keep bf16 weights in PyTorch's layout (what the engine did before it packed them for oneDNN)")
    parser.add_argument("--expanded-mla", action="store_true",
                        help="DeepSeek-V3 attention as transformers runs it, expanding every cached latent each step "
                             "(what the engine did before it absorbed kv_b_proj)")
    parser.add_argument("--stock-forward", action="store_true",
                        help="transformers' forward for Llama-family models (what the engine ran before its lean forward)")
    args = parser.parse_args(argv)
    if args.stock_forward:
        runner_module.lean_decoder = lambda model: None
    if args.unpacked:
        runner_module.pack_bf16_weights = lambda model: {}
    if args.expanded_mla:
        runner_module.install_absorbed_mla = lambda model: 0
    for name in args.models:
        model_dir = find_model(name)  # a demo, a real-shape model or a model directory's path
        runner = Runner.prepare(load_model(model_dir, "cpu", args.precision), exact=False)
        for rows in args.rows:
            ids = prompts(model_dir, rows)
            with torch.inference_mode():
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    best = min(decode_steps(runner, *prefill(runner, ids, args.steps), args.steps) for _ in range(3))
                    print(f"{name} {args.precision} rows={rows} threads={threads}: {1e3 * best:.1f} ms per step, "
                          f"{rows / best:.1f} tokens/s", flush=True)
                stores, tokens = prefill(runner, ids, args.steps)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    decode_steps(runner, stores, tokens, args.steps)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top), flush=True)
        del runner
    return 0


if __name__ == "__main__":
    sys.exit(main())
