"""What forwarding between nodes costs, and what a node's death does to the requests on it.

Two nodes of one appliance on this machine (node-1 on 127.0.0.1, node-2 on 127.0.0.2; one SQLite database, one KEK,
one model store), demo-dense placed on node-2. The same streamed chat requests go straight to node-2 and to node-1,
which forwards them; then, under load through node-1, node-2's web process is SIGKILLed, and the script counts
what failed and what was answered, and times how long node-1 takes to refuse new requests and to show node-2 down.

    .venv/bin/python bench/forwarding.py                       # 1 and 16 clients, 32 tokens
    .venv/bin/python bench/forwarding.py --levels 1 16 64 --max-tokens 64

Both nodes share this machine's cores, so the forwarded path's extra process competes with the engine here; on
separate boxes it would not. Figures are written as JSON under --out. Not part of `make test`.
"""
from __future__ import annotations

import asyncio
import base64
import secrets
import signal
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_box import Appliance, temp_home  # noqa: E402
from bench.serve_load import compare_paths, one_request, path_comparison_arguments, write_report  # noqa: E402

MODEL = "demo-dense"
NODE_STATE = ("from appliance.models import Node; from django.utils import timezone; "
              "print(Node.objects.get(name='node-2').state(timezone.now()))")


def start_nodes(work: Path) -> tuple[Appliance, Appliance]:
    shared = {"DATABASE_URL": f"sqlite:///{work / 'appliance.sqlite3'}",
              "APPLIANCE_AUDIT_KEK": base64.b64encode(secrets.token_bytes(32)).decode(),
              "APPLIANCE_MODEL_STORE": str(work / "store"), "APPLIANCE_NODE_HEARTBEAT_S": "1"}
    first = Appliance(work / "node-1", node_env={**shared, "APPLIANCE_NODE": "node-1"})
    second = Appliance(work / "node-2", host="127.0.0.2", node_env={**shared, "APPLIANCE_NODE": "node-2"})
    first.start([])
    second.start([])
    first.manage("import_model", str(first.demo_dir / MODEL), "--name", MODEL, "--kind", "dense", "--wait")
    first.manage("deploy", MODEL, "--node", "node-2", "--wait")
    first.wait_for_fit_analyses([MODEL])
    serving = ("from appliance.models import Node; "
               f"print({MODEL!r} in Node.objects.get(name='node-2').serving)")
    deadline = time.monotonic() + 60
    while first.manage("shell", "--no-imports", "-c", serving).split()[-1] != "True":
        if time.monotonic() > deadline:
            raise RuntimeError("node-2's heartbeat never named the model")
        time.sleep(0.5)
    return first, second


def first_refusal_after(url: str, key: str, since: float, timeout: float = 60) -> float:
    """Return seconds from `since` until node-1 answers a request for the model with a 503."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30,
                              headers={"Authorization": f"Bearer {key}"})
        if response.status_code == 503:
            return time.monotonic() - since
        time.sleep(0.05)
    raise RuntimeError("node-1 kept answering after node-2 died")


async def load_and_kill(first: Appliance, second: Appliance, clients: int, max_tokens: int, after_s: float) -> dict:
    """Drive node-1 with `clients` streams of the model, SIGKILL node-2's web process `after_s` in, keep sending
    for a few seconds more; count the answers, the streams that failed mid-answer and the requests refused."""
    headers = {"Authorization": f"Bearer {first.key}"}
    extra = {"ignore_eos": True, "min_tokens": max_tokens}
    samples, stop_at = [], [float("inf")]
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:

        async def worker(w: int) -> None:
            i = w
            while time.monotonic() < stop_at[0]:
                samples.append(await one_request(client, first.url, headers, MODEL, i, max_tokens, extra))
                i += clients

        workers = [asyncio.create_task(worker(w)) for w in range(clients)]
        await asyncio.sleep(after_s)
        web = second.procs[-1]
        web.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        stop_at[0] = killed + 3.0
        web.wait(timeout=30)
        refused_s = await asyncio.to_thread(first_refusal_after, first.url, first.key, killed)
        await asyncio.gather(*workers)
    while first.manage("shell", "--no-imports", "-c", NODE_STATE).split()[-1] != "down":
        time.sleep(0.2)
    errors = [s.error or "" for s in samples]
    return {"clients": clients, "answered": errors.count(""),
            "failed_mid_answer": sum(e.startswith("in-stream error") for e in errors),
            "refused_503": sum(e.startswith("HTTP 503") for e in errors),
            "other_errors": sorted({e for e in errors if e and not e.startswith(("in-stream", "HTTP 503"))})[:3],
            "refused_503_after_s": refused_s, "shown_down_after_s": time.monotonic() - killed}


def main(argv: list[str] | None = None) -> int:
    args = path_comparison_arguments(__doc__.split("\n\n")[0], argv, ROOT / "bench" / "out")
    work = temp_home()
    first, second = start_nodes(work)
    report = {"model": MODEL, "max_tokens": args.max_tokens}
    try:
        paths = {"direct (node-2)": (second.url, {"Authorization": f"Bearer {second.key}"}),
                 "forwarded (node-1 -> node-2)": (first.url, {"Authorization": f"Bearer {first.key}"})}
        extra = {"ignore_eos": True, "min_tokens": args.max_tokens}
        report["rows"] = compare_paths(paths, MODEL, args.levels, args.max_tokens, args.rounds, extra)
        for clients in args.levels:
            pair = [r for r in report["rows"] if r["clients"] == clients]
            ratio = pair[1]["tokens_per_s"] / pair[0]["tokens_per_s"]
            print(f"{clients:3d} clients: forwarded/direct tokens/s {ratio:.2f}, "
                  f"TTFT p50 {pair[1]['ttft_p50_ms'] - pair[0]['ttft_p50_ms']:+.1f} ms", flush=True)
        failover = asyncio.run(load_and_kill(first, second, max(args.levels), args.max_tokens, after_s=3.0))
        report["failover"] = failover
        print(f"node-2 killed under {failover['clients']} clients through node-1: {failover['answered']} answered, "
              f"{failover['failed_mid_answer']} failed mid-answer, {failover['refused_503']} refused with a 503 "
              f"(other errors: {failover['other_errors']}); the first 503 came "
              f"{failover['refused_503_after_s']:.2f}s after the kill; node-2 shown down after "
              f"{failover['shown_down_after_s']:.1f}s", flush=True)
    finally:
        first.stop()
        second.stop()
    write_report(args.out, "forwarding", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
