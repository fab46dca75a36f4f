"""Hold the throughput model's decode step against the builtin engine's measured one, on this CPU.

    .venv/bin/python bench/advisor_cpu.py                  # the demo models, 1 and 16 rows
    .venv/bin/python bench/advisor_cpu.py --rows 1 4 16 --steps 20

The measured figure is bench/engine_step.py's runner step (best of three rounds, exact and plain mode);
the prediction is inference/fit/throughput.decode_step for the same model, batch and context on this
host, with its bandwidth and FLOP/s measured first (hardware.measure_host) and the builtin engine's
assumed efficiency factors (calibration.ASSUMED: no published figures exist for this engine). The error
says how far those assumptions are from this box. Writes nothing; not part of `make test`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.engine_step import prompts, runner_step_ms  # noqa: E402
from inference.demo_models import DEMO_SPECS, make_demo_models  # noqa: E402
from inference.fit import analyze, calibration  # noqa: E402
from inference.fit.hardware import inventory  # noqa: E402
from inference.fit.parallel import parse_plan  # noqa: E402
from inference.fit.profile import ModelProfile  # noqa: E402
from inference.fit.throughput import decode_step  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEMO_SPECS), choices=list(DEMO_SPECS))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the engine's default on 2 cores: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hw = inventory(measure=True)
    params = calibration.engine_params("builtin", hw)
    print(f"this box: {hw.label}, measured {hw.host_bandwidth_tbs * 1e3:.1f} GB/s, {hw.host_bf16_tflops * 1e3:.1f} "
          f"GFLOP/s (float32 matmul, {args.threads} thread); builtin factors: {params.basis}")
    print(f"{'model':<15} {'rows':>4} {'context':>7} {'exact ms':>9} {'plain ms':>9} {'predicted ms':>12} "
          f"{'vs exact':>9} {'vs plain':>9}  bound")
    errors = []
    with tempfile.TemporaryDirectory(prefix="advisor-cpu-") as tmp:
        make_demo_models(Path(tmp), names=args.models)
        for name in args.models:
            model_dir = Path(tmp) / name
            report = analyze(model_dir, hw, 512, "stored")
            profile = ModelProfile.from_dict(report.profiles["stored"])
            for rows in args.rows:
                ids = prompts(model_dir, rows)
                context = sum(len(p) for p in ids) / rows + args.steps / 2
                exact = runner_step_ms(model_dir, rows, True, args.steps)
                plain = runner_step_ms(model_dir, rows, False, args.steps)
                step = decode_step(profile, hw, parse_plan("tp1", 0), params, rows, context,
                                   profile.kv_bytes_per_token_builtin)
                predicted = step["step_s"] * 1e3
                bound = max(step["parts_s"], key=step["parts_s"].get)
                errors += [predicted / exact - 1, predicted / plain - 1]
                print(f"{name:<15} {rows:>4} {context:7.0f} {exact:9.2f} {plain:9.2f} {predicted:12.2f} "
                      f"{predicted / exact - 1:+9.1%} {predicted / plain - 1:+9.1%}  {bound}", flush=True)
    print(f"mean |error| {sum(abs(e) for e in errors) / len(errors):.1%}, worst {max(errors, key=abs):+.1%} "
          f"(the builtin factors are assumed, ±{params.uncertainty:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
