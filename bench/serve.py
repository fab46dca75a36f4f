"""Benchmark the appliance's chat API against `transformers serve`, with and without continuous batching.

    .venv/bin/python bench/serve.py                       # all three demo models, 1/4/16/64 clients
    .venv/bin/python bench/serve.py --models demo-dense --levels 1 16
    .venv/bin/python bench/serve.py --servers appliance --exact off   # plain batched products on CPU

For each demo model: the static-batch ceiling (one `generate` over 16 prompts), the sequential figure
(the same prompts one `generate` after another) and the appliance's engine driven in process without
HTTP ("engine-no-http"), all measured in this process while the servers are idle; then
the appliance (web + worker, models deployed through the registry) and `transformers serve` without and
with `--continuous-batching` on the same model directory, each driven by the same streaming clients.
Prints a table, checks the issue's targets, and writes bench/out/serve-<time>.json and .png.
Needs `fastapi` for `transformers serve` (pip install fastapi). Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_box import KINDS, Appliance, TransformersServe, temp_home  # noqa: E402
from bench.serve_load import drive, engine_in_process, in_process_baselines, warm_up  # noqa: E402

SERVERS = ("appliance", "transformers", "transformers-cb")
ROWS = ("engine-no-http", *SERVERS)  # the appliance's engine driven in process: what HTTP costs


def measure(url: str, headers: dict, model: str, levels: list[int], max_tokens: int, rounds: int) -> list[dict]:
    warm_up(url, headers, model)
    results = []
    for clients in levels:
        row = asyncio.run(drive(url, headers, model, clients, max_tokens, rounds))
        print(f"    {clients:>3} clients: {row['tokens_per_s']:8.1f} tok/s  TTFT p50 {row['ttft_p50_ms']:7.1f} ms  "
              f"p95 {row['ttft_p95_ms']:7.1f} ms (burst p50 {row['ttft_burst_p50_ms']:7.1f} ms)  "
              f"ITL p50 {row['itl_p50_ms']:6.1f} ms  errors {row['errors']}", flush=True)
        results.append(row)
    return results


EXACT = {"auto": None, "on": True, "off": False}  # --exact → Engine(exact=...), as APPLIANCE_ENGINE_EXACT


def run(models: list[str], levels: list[int], max_tokens: int, rounds: int, servers: list[str],
        exact: str = "auto") -> dict:
    home = temp_home()
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "max_tokens": max_tokens, "levels": levels,
                    "rounds": rounds, "exact": exact,
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "load_before": os.getloadavg()}, "models": {}}
    box = Appliance(home, exact=exact)
    try:
        print("writing demo models and starting the appliance ...", flush=True)
        box.start(models if "appliance" in servers else [])
        for name in models:
            print(f"{name}: in-process baselines (16 prompts x {max_tokens} tokens)", flush=True)
            report["models"][name] = {"kind": KINDS[name], **in_process_baselines(box.demo_dir / name, max_tokens)}
            for key in ("static_batch", "sequential"):
                print(f"    {key:>12}: {report['models'][name][key]['tokens_per_s']:8.1f} tok/s "
                      f"({report['models'][name]['threads']} torch threads)", flush=True)
            report["models"][name]["engine-no-http"] = engine_in_process(
                box.demo_dir / name, levels, max_tokens, EXACT[exact])
        if "appliance" in servers:
            for name in models:
                print(f"{name}: appliance", flush=True)
                report["models"][name]["appliance"] = measure(
                    box.url, {"Authorization": f"Bearer {box.key}"}, name, levels, max_tokens, rounds)
        box.stop()
        for name in models:
            for server in servers:
                if server == "appliance":
                    continue
                print(f"{name}: {server}", flush=True)
                hf = TransformersServe(box.demo_dir / name, server == "transformers-cb", home / f"{server}-{name}.log")
                try:
                    hf.start()
                    report["models"][name][server] = measure(hf.url, {}, hf.model, levels, max_tokens, rounds)
                finally:
                    hf.stop()
    finally:
        box.stop()
    report["machine"]["load_after"] = os.getloadavg()
    report["targets"] = check_targets(report)
    return report


def at(rows: list[dict] | None, clients: int) -> dict | None:
    return next((r for r in rows or [] if r["clients"] == clients), None)


def check_targets(report: dict) -> list[dict]:
    """Return the issue's targets with the measured figures and whether each was met."""
    checks = []
    for name, figures in report["models"].items():
        ours16, ours1, ours64 = (at(figures.get("appliance"), c) for c in (16, 1, 64))
        cb16 = at(figures.get("transformers-cb"), 16)
        if ours16 is None:
            continue
        tps = ours16["tokens_per_s"]
        if figures["kind"] in ("dense", "distilled"):
            if cb16 is not None:
                checks.append(_check(name, ">= 2x transformers serve --continuous-batching at 16 clients",
                                     tps / max(cb16["tokens_per_s"], 1e-9), 2.0))
            checks.append(_check(name, ">= 80% of the static-batch ceiling at 16 clients",
                                 tps / figures["static_batch"]["tokens_per_s"], 0.8))
        else:
            checks.append(_check(name, ">= 4x sequential tokens/s at 16 clients",
                                 tps / figures["sequential"]["tokens_per_s"], 4.0))
        if ours1 is not None:
            checks.append(_check(name, "TTFT p50 at 16 clients <= 3x single-client TTFT",
                                 ours16["ttft_p50_ms"] / ours1["ttft_p50_ms"], 3.0, at_most=True))
        if ours64 is not None:
            checks.append(_check(name, "no errors at 64 clients", ours64["errors"], 0, at_most=True))
    return checks


def _check(model: str, target: str, value: float, bound: float, at_most: bool = False) -> dict:
    met = value <= bound if at_most else value >= bound
    return {"model": model, "target": target, "value": round(value, 3), "bound": bound, "met": met}


def print_table(report: dict) -> None:
    print()
    print(f"{'model':<15} {'server':<16} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} "
          f"{'burst p50':>9} {'ITL p50':>8} {'errors':>6}")
    for name, figures in report["models"].items():
        for key in ("static_batch", "sequential"):
            print(f"{name:<15} {key.replace('_', '-') + ' (gen)':<16} {16:>7} {figures[key]['tokens_per_s']:8.1f}")
        for server in ROWS:
            for row in figures.get(server) or []:
                print(f"{name:<15} {server:<16} {row['clients']:>7} {row['tokens_per_s']:8.1f} "
                      f"{row['ttft_p50_ms']:8.1f}ms {row['ttft_p95_ms']:8.1f}ms {row['ttft_burst_p50_ms']:8.1f}ms "
                      f"{row['itl_p50_ms']:7.1f}ms "
                      f"{row['errors']:>6}")
    print()
    for check in report["targets"]:
        print(f"{'MET ' if check['met'] else 'MISS'} {check['model']:<15} {check['target']}: {check['value']}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        figures = report["models"][name]
        for server in ROWS:
            rows = figures.get(server) or []
            if rows:
                ax.plot([r["clients"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=server)
        ax.axhline(figures["static_batch"]["tokens_per_s"], color="grey", linestyle="--", label="static batch (16)")
        ax.axhline(figures["sequential"]["tokens_per_s"], color="grey", linestyle=":", label="sequential")
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel("generated tokens/s (from usage)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends back to back")
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    parser.add_argument("--exact", choices=list(EXACT), default="auto",
                        help="the appliance's APPLIANCE_ENGINE_EXACT (auto: bit-exact batching on CPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args.models, args.levels, args.max_tokens, args.rounds, args.servers, args.exact)
    print_table(report)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"serve-{stamp}.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / f"serve-{stamp}.png")
    print(f"\nwrote {args.out / f'serve-{stamp}.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
