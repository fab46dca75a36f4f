"""Benchmark the appliance's chat API against what users would pick instead, on the same model files, in one run.

    .venv/bin/python bench/serve.py                       # every model and server, 1/16/64 clients
    .venv/bin/python bench/serve.py --models demo-dense --levels 1 16 --servers appliance llama.cpp-f16
    .venv/bin/python bench/serve.py --servers appliance --exact on   # bit-exact batching

Servers: the appliance (web + worker, models deployed through the registry, over HTTP), llama.cpp's
`llama-server` (what Ollama runs) on GGUF f16 and q8_0 of the same weights converted with llama.cpp's own
script (bench/gguf_convert.py), vLLM's CPU build in its own virtualenv, and `transformers serve` without and
with `--continuous-batching`. The peers are set up once by `bash bench/peers_setup.sh`; a missing one is
reported and skipped. Models: the three demos, the real model (the bundled SmolLM2-135M, as its import
converts it) and the random-weight real-shape models of bench/shapes.py.
Every server is asked for exactly --max-tokens tokens per request (ignore_eos / min_tokens where it has
them); the tokens counted are those `usage.completion_tokens` reports, and answers of another length are
counted per row. Unless --skip-in-process, each demo also gets the static-batch ceiling (one `generate` over
16 prompts), the sequential figure and the appliance's engine driven in process without HTTP
("engine-no-http"), measured while the servers are idle. Prints the ratios of the appliance to each peer
first, then every figure; writes bench/out/serve-<time>.json and .svg. Not part of `make test`.
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

from bench.serve_box import (  # noqa: E402
    DEMOS, KINDS, Appliance, LlamaServer, TransformersServe, VllmServe, temp_home,
)
from bench.serve_load import MIN_REQUESTS, drive, engine_in_process, in_process_baselines, warm_up  # noqa: E402
from inference.engine.precision import cpu_has_native_bf16  # noqa: E402

PEERS = ("llama.cpp-f16", "llama.cpp-q8_0", "vllm", "transformers", "transformers-cb")
SERVERS = ("appliance", *PEERS)
ROWS = ("engine-no-http", *SERVERS)  # the appliance's engine driven in process: what HTTP costs


def exact_length_fields(server: str, max_tokens: int) -> dict:
    """The request fields that make a server generate exactly max_tokens, where it has them."""
    if server.startswith("llama.cpp"):
        return {"ignore_eos": True}
    if server in ("vllm", "appliance"):  # the appliance's API honours both as extensions, as vLLM does
        return {"ignore_eos": True, "min_tokens": max_tokens}
    # transformers serve has no such field: its short answers are counted.
    return {}


def measure(url: str, headers: dict, model: str, levels: list[int], max_tokens: int, rounds: int,
            extra: dict | None = None, min_requests: int = MIN_REQUESTS) -> list[dict]:
    warm_up(url, headers, model)
    results = []
    for clients in levels:
        row = asyncio.run(drive(url, headers, model, clients, max_tokens, rounds, extra, min_requests))
        print(f"    {clients:>3} clients: {row['tokens_per_s']:8.1f} tok/s  TTFT p50 {row['ttft_p50_ms']:7.1f} ms  "
              f"p95 {row['ttft_p95_ms']:7.1f} ms (burst p50 {row['ttft_burst_p50_ms']:7.1f} ms)  "
              f"ITL p50 {row['itl_p50_ms']:6.1f} ms  errors {row['errors']}  not {max_tokens} tokens "
              f"{row['not_full_length']}", flush=True)
        results.append(row)
    return results


EXACT = {"auto": None, "on": True, "off": False}  # --exact → Engine(exact=...), as APPLIANCE_ENGINE_EXACT


def peer(server: str, model_dir: Path, levels: list[int], threads: int, log: Path):
    """Return the (not yet started) peer server for one model."""
    if server.startswith("llama.cpp"):
        return LlamaServer(model_dir, server.split("-", 1)[1], slots=max(levels), threads=threads, log=log)
    if server == "vllm":
        # The same number format the appliance picks on this CPU (APPLIANCE_ENGINE_PRECISION=auto).
        dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
        return VllmServe(model_dir, dtype, max_seqs=max(levels), threads=threads, log=log)
    return TransformersServe(model_dir, server == "transformers-cb", log)


def run(models: list[str], levels: list[int], max_tokens: int, rounds: int, servers: list[str],
        exact: str = "auto", in_process: bool = True, threads: int | None = None,
        min_requests: int = MIN_REQUESTS) -> dict:
    home = temp_home()
    threads = threads or os.cpu_count() or 1
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "max_tokens": max_tokens, "levels": levels,
                    "rounds": rounds, "min_requests": min_requests, "exact": exact, "peer_threads": threads,
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "load_before": os.getloadavg()}, "models": {}}
    box = Appliance(home, exact=exact)
    try:
        print("writing demo models and starting the appliance ...", flush=True)
        box.start(models if "appliance" in servers else [])
        for name in models:
            report["models"][name] = {"kind": KINDS[name]}
            if not in_process or name not in DEMOS:
                continue
            print(f"{name}: in-process baselines (16 prompts x {max_tokens} tokens)", flush=True)
            report["models"][name].update(in_process_baselines(box.model_dir(name), max_tokens))
            for key in ("static_batch", "sequential"):
                print(f"    {key:>12}: {report['models'][name][key]['tokens_per_s']:8.1f} tok/s "
                      f"({report['models'][name]['threads']} torch threads)", flush=True)
            report["models"][name]["engine-no-http"] = engine_in_process(
                box.model_dir(name), levels, max_tokens, EXACT[exact])
        if "appliance" in servers:
            for name in models:
                print(f"{name}: appliance", flush=True)
                report["models"][name]["appliance"] = measure(
                    box.url, {"Authorization": f"Bearer {box.key}"}, name, levels, max_tokens, rounds,
                    exact_length_fields("appliance", max_tokens), min_requests)
        box.stop()
        for name in models:
            for server in servers:
                if server == "appliance":
                    continue
                print(f"{name}: {server}", flush=True)
                other = peer(server, box.model_dir(name), levels, threads, home / f"{server}-{name}.log")
                try:
                    other.start()
                    report["models"][name][server] = measure(
                        other.url, {}, other.model, levels, max_tokens, rounds, exact_length_fields(server, max_tokens),
                        min_requests)
                except Exception as exc:  # a peer that cannot serve this model is a finding, not the end of the run
                    print(f"    {server} failed: {str(exc)[-600:]}", flush=True)
                    report["models"][name][server] = {"failed": str(exc)[-3000:]}
                finally:
                    other.stop()
    finally:
        box.stop()
    report["machine"]["load_after"] = os.getloadavg()
    report["targets"] = check_targets(report)
    return report


def rows_of(figures: dict, server: str) -> list[dict]:
    """A server's measured rows for one model ([] where it was not run or failed to start)."""
    rows = figures.get(server)
    return rows if isinstance(rows, list) else []


def at(rows: list[dict] | None, clients: int) -> dict | None:
    return next((r for r in rows or [] if r["clients"] == clients), None)


def ratios(report: dict) -> list[dict]:
    """The appliance's tokens/s over each peer's, per model and concurrency."""
    out = []
    for name, figures in report["models"].items():
        for row in rows_of(figures, "appliance"):
            for server in PEERS:
                theirs = at(rows_of(figures, server), row["clients"])
                if theirs and theirs["tokens_per_s"] > 0:
                    out.append({"model": name, "peer": server, "clients": row["clients"],
                                "ratio": row["tokens_per_s"] / theirs["tokens_per_s"]})
    return out


def check_targets(report: dict) -> list[dict]:
    """Return the issue's throughput targets with the measured ratios and whether each was met."""
    checks = []
    for name, figures in report["models"].items():
        ours = rows_of(figures, "appliance")
        if not ours:
            continue
        shape = name not in DEMOS
        llama = [rows_of(figures, s) for s in ("llama.cpp-f16", "llama.cpp-q8_0")]
        for row in ours:
            c, tps = row["clients"], row["tokens_per_s"]
            best_llama = max((r["tokens_per_s"] for rows in llama if (r := at(rows, c))), default=None)
            if best_llama:
                bound = 1.0 if c >= 16 or (shape and c >= 8) else (0.9 if shape else 0.5) if c == 1 else None
                if bound is not None:
                    checks.append(_check(name, f">= {bound}x llama.cpp (best of f16/q8_0) at {c} clients",
                                         tps / best_llama, bound))
            vllm = at(rows_of(figures, "vllm"), c)
            if vllm and shape and c in (8, 16):
                checks.append(_check(name, f">= 1.0x vLLM-CPU at {c} clients", tps / max(vllm["tokens_per_s"], 1e-9), 1.0))
            for server in ("transformers", "transformers-cb"):
                theirs = at(rows_of(figures, server), c)
                if theirs:
                    checks.append(_check(name, f"ahead of {server} at {c} clients",
                                         tps / max(theirs["tokens_per_s"], 1e-9), 1.0))
        ours16, ours1, ours64 = (at(ours, c) for c in (16, 1, 64))
        if ours16 and "static_batch" in figures:
            checks.append(_check(name, ">= 80% of the static-batch ceiling at 16 clients",
                                 ours16["tokens_per_s"] / figures["static_batch"]["tokens_per_s"], 0.8))
        if ours16 and ours1:
            checks.append(_check(name, "TTFT p50 at 16 clients <= 3x single-client TTFT",
                                 ours16["ttft_p50_ms"] / ours1["ttft_p50_ms"], 3.0, at_most=True))
        if ours64 is not None:
            checks.append(_check(name, "no errors at 64 clients", ours64["errors"], 0, at_most=True))
    return checks


def _check(model: str, target: str, value: float, bound: float, at_most: bool = False) -> dict:
    met = value <= bound if at_most else value >= bound
    return {"model": model, "target": target, "value": round(value, 3), "bound": bound, "met": met}


def print_table(report: dict) -> None:
    print("\nappliance tokens/s over each peer's (ratios first; > 1 means the appliance is faster)")
    levels = report["levels"]
    print(f"{'model':<20} {'peer':<16} " + " ".join(f"{f'{c} cl':>8}" for c in levels))
    table = ratios(report)
    for name in report["models"]:
        for server in PEERS:
            cells = {r["clients"]: r["ratio"] for r in table if r["model"] == name and r["peer"] == server}
            if cells:
                print(f"{name:<20} {server:<16} " + " ".join(
                    f"{cells[c]:8.2f}" if c in cells else f"{'-':>8}" for c in levels))
    print()
    print(f"{'model':<20} {'server':<16} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} "
          f"{'burst p50':>9} {'ITL p50':>8} {'errors':>6} {'short':>5}")
    for name, figures in report["models"].items():
        for key in ("static_batch", "sequential"):
            if key in figures:
                print(f"{name:<20} {key.replace('_', '-') + ' (gen)':<16} {16:>7} {figures[key]['tokens_per_s']:8.1f}")
        for server in ROWS:
            if isinstance(figures.get(server), dict):
                print(f"{name:<20} {server:<16} failed to serve: {figures[server]['failed'][-160:]!r}")
            for row in rows_of(figures, server):
                print(f"{name:<20} {server:<16} {row['clients']:>7} {row['tokens_per_s']:8.1f} "
                      f"{row['ttft_p50_ms']:8.1f}ms {row['ttft_p95_ms']:8.1f}ms {row['ttft_burst_p50_ms']:8.1f}ms "
                      f"{row['itl_p50_ms']:7.1f}ms {row['errors']:>6} {row.get('not_full_length', 0):>5}")
    print()
    for check in report["targets"]:
        print(f"{'MET ' if check['met'] else 'MISS'} {check['model']:<20} {check['target']}: {check['value']}")


def plot(report: dict, path: Path) -> None:
    """Write tokens/s against concurrent clients, one panel per model, as SVG (drawn by the charts package)."""
    from functools import partial

    import charts

    colours = dict(zip(ROWS, charts.plots.COLOURS))
    draws = []
    for name, figures in report["models"].items():
        lines = [{"label": server, "xs": [r["clients"] for r in rows], "ys": [r["tokens_per_s"] for r in rows],
                  "colour": colours[server], "marker": "o"} for server in ROWS if (rows := rows_of(figures, server))]
        hlines = [{"y": figures[key]["tokens_per_s"], "colour": "#7f7f7f", "text": text}
                  for key, text in (("static_batch", "static batch (16)"), ("sequential", "sequential"))
                  if key in figures]
        draws.append(partial(charts.xy, title=name, lines=lines, hlines=hlines, xlog=True,
                             xlabel="concurrent streaming clients", ylabel="generated tokens/s (from usage)"))
    path.write_text(charts.panels(500 * max(1, len(draws)), 400, "serving benchmark", draws))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 8, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends back to back")
    parser.add_argument("--min-requests", type=int, default=MIN_REQUESTS,
                        help="requests per level at the least (a single client on a real-shape model takes seconds a token)")
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    parser.add_argument("--exact", choices=list(EXACT), default="auto",
                        help="the appliance's APPLIANCE_ENGINE_EXACT (auto: the appliance's default, plain batched products)")
    parser.add_argument("--skip-in-process", action="store_true",
                        help="leave out the static-batch, sequential and engine-no-http baselines of the demos")
    parser.add_argument("--peer-threads", type=int, default=None,
                        help="threads of llama-server and vLLM (default: every core)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args.models, args.levels, args.max_tokens, args.rounds, args.servers, args.exact,
                 in_process=not args.skip_in_process, threads=args.peer_threads, min_requests=args.min_requests)
    print_table(report)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"serve-{stamp}.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / f"serve-{stamp}.svg")
    print(f"\nwrote {args.out / f'serve-{stamp}.json'} and .svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
