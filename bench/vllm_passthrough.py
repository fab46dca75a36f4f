"""What the appliance's door costs a deployment on vLLM: the same streamed chat requests sent through the team API
and straight to the engine's own endpoint on loopback, at a few client counts.

    .venv/bin/python bench/vllm_passthrough.py                    # demo-dense, 1 and 16 clients, 32 tokens
    .venv/bin/python bench/vllm_passthrough.py --levels 1 16 64 --max-tokens 64

Needs vLLM's virtualenv (bash bench/peers_setup.sh vllm, or APPLIANCE_VLLM_PYTHON). Both paths ask for exactly
max_tokens tokens (ignore_eos, min_tokens), so they generate the same work; figures are written as JSON under
--out. Not part of `make test`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_box import PEERS_HOME, Appliance, temp_home  # noqa: E402
from bench.serve_load import compare_paths, path_comparison_arguments, write_report  # noqa: E402

MODEL = "demo-dense-vllm"


def engine_url(box: Appliance) -> str:
    """Return the vLLM engine's own loopback URL, read from its process's command line."""
    query = ("from audit.models import AuditEvent as E; print([e.details['pid'] for e in E.objects.filter("
             f"action='deployment.load', outcome='ok', target={MODEL!r})][-1])")
    args = psutil.Process(int(box.manage("shell", "--no-imports", "-c", query).split()[-1])).cmdline()
    return f"http://127.0.0.1:{args[args.index('--port') + 1]}"


def main(argv: list[str] | None = None) -> int:
    args = path_comparison_arguments(__doc__.split("\n\n")[0], argv, ROOT / "bench" / "out")
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
        report = {"model": MODEL, "max_tokens": args.max_tokens,
                  "rows": compare_paths(paths, MODEL, args.levels, args.max_tokens, args.rounds, extra)}
    finally:
        box.stop()
    write_report(args.out, "vllm-passthrough", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
