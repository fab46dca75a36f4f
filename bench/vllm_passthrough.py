"""What the appliance's door costs a deployment on vLLM: the same streamed chat requests sent through the team API
and straight to the engine's own endpoint on loopback, at a few client counts.

    .venv/bin/python bench/vllm_passthrough.py                    # demo-dense, 1 and 16 clients, 32 tokens
    .venv/bin/python bench/vllm_passthrough.py --levels 1 16 64 --max-tokens 64

Needs vLLM's virtualenv (bash bench/peers_setup.sh vllm, or APPLIANCE_VLLM_PYTHON). Both paths ask for exactly
max_tokens tokens (ignore_eos, min_tokens), so they generate the same work; figures are written as JSON under
--out. Not part of `make test`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_box import PEERS_HOME, Appliance, temp_home  # noqa: E402
from bench.serve_load import drive, warm_up  # noqa: E402

MODEL = "demo-dense-vllm"


def engine_url(box: Appliance) -> str:
    """Return the vLLM engine's own loopback URL, read from its process's command line."""
    query = ("from audit.models import AuditEvent as E; print([e.details['pid'] for e in E.objects.filter("
             f"action='deployment.load', outcome='ok', target={MODEL!r})][-1])")
    args = psutil.Process(int(box.manage("shell", "--no-imports", "-c", query).split()[-1])).cmdline()
    return f"http://127.0.0.1:{args[args.index('--port') + 1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    os.environ.setdefault("APPLIANCE_VLLM_PYTHON", str(PEERS_HOME / "vllm-venv" / "bin" / "python"))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    box = Appliance(temp_home())
    try:
        box.start([])
        box.manage("import_model", str(box.demo_dir / "demo-dense"), "--name", MODEL, "--kind", "dense", "--wait")
        box.manage("deploy", MODEL, "--engine", "vllm", "--wait", "--timeout", "900", timeout=960)
        box.wait_for_fit_analyses([MODEL])
        paths = {"appliance": (box.url, {"Authorization": f"Bearer {box.key}"}), "vllm-direct": (engine_url(box), {})}
        extra = {"ignore_eos": True, "min_tokens": args.max_tokens}
        report = {"model": MODEL, "max_tokens": args.max_tokens, "rows": []}
        for name, (url, headers) in paths.items():
            warm_up(url, headers, MODEL)
        for clients in args.levels:
            for name, (url, headers) in paths.items():  # alternated per level, so drift hits both alike
                row = asyncio.run(drive(url, headers, MODEL, clients, args.max_tokens, args.rounds, extra))
                report["rows"].append({"path": name, **row})
                print(f"{name:12s} {clients:3d} clients  {row['tokens_per_s']:8.1f} tok/s  "
                      f"TTFT p50 {row['ttft_p50_ms']:7.1f} ms  ITL p50 {row['itl_p50_ms']:6.1f} ms  "
                      f"errors {row['errors']}", flush=True)
    finally:
        box.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"vllm-passthrough-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
