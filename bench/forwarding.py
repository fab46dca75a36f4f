"""What forwarding between nodes costs, and what a node's death does to the requests on it.

Three nodes of one appliance on this machine (node-i on 127.0.0.i; one SQLite database, one KEK, one model store):
demo-dense placed on node-2 alone, twin-dense on node-3 with a replica on node-2. The same streamed chat requests
go straight to node-2 and to node-1, which forwards them. Then, under load through node-1: node-3's web process is
SIGKILLed while it serves twin-dense beside its replica (what failed, what was rerouted to node-2), and node-2's
while it alone serves demo-dense (what failed, how soon node-1 refuses new requests); each time the script times
how long node-1 takes to show the node down.

    .venv/bin/python bench/forwarding.py                       # 1 and 16 clients, 32 tokens
    .venv/bin/python bench/forwarding.py --levels 1 16 64 --max-tokens 64

The nodes share this machine's cores, so the forwarded path's extra process competes with the engine here; on
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
TWIN = "twin-dense"
NODE_STATE = ("from appliance.models import Node; from django.utils import timezone; "
              "print(Node.objects.get(name=%r).state(timezone.now()))")


def start_nodes(work: Path) -> list[Appliance]:
    shared = {"DATABASE_URL": f"sqlite:///{work / 'appliance.sqlite3'}",
              "APPLIANCE_AUDIT_KEK": base64.b64encode(secrets.token_bytes(32)).decode(),
              "APPLIANCE_MODEL_STORE": str(work / "store"), "APPLIANCE_NODE_HEARTBEAT_S": "1"}
    nodes = [Appliance(work / f"node-{i}", host=f"127.0.0.{i}", node_env={**shared, "APPLIANCE_NODE": f"node-{i}"})
             for i in (1, 2, 3)]
    for node in nodes:
        node.start([])
    first = nodes[0]
    for name in (MODEL, TWIN):
        first.manage("import_model", str(first.demo_dir / MODEL), "--name", name, "--kind", "dense", "--wait")
    first.manage("deploy", MODEL, "--node", "node-2", "--wait")
    first.manage("deploy", TWIN, "--node", "node-3", "--replica", "node-2", "--wait")
    first.wait_for_fit_analyses([MODEL, TWIN])
    serving = ("from appliance.models import Node; s = {n.name: n.serving for n in Node.objects.all()}; "
               f"print({MODEL!r} in s['node-2'] and {TWIN!r} in s['node-2'] and {TWIN!r} in s['node-3'])")
    deadline = time.monotonic() + 60
    while first.manage("shell", "--no-imports", "-c", serving).split()[-1] != "True":
        if time.monotonic() > deadline:
            raise RuntimeError("node-2's and node-3's heartbeats never named what they serve")
        time.sleep(0.5)
    return nodes


def first_refusal_after(url: str, key: str, model: str, since: float, timeout: float = 60) -> float:
    """Return seconds from `since` until node-1 answers a request for the model with a 503."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30,
                              headers={"Authorization": f"Bearer {key}"})
        if response.status_code == 503:
            return time.perf_counter() - since
        time.sleep(0.05)
    raise RuntimeError("node-1 kept answering after the serving node died")


async def load_and_kill(first: Appliance, victim: Appliance, model: str, clients: int, max_tokens: int,
                        after_s: float, replica_left: bool) -> dict:
    """Drive node-1 with `clients` streams of the model, SIGKILL the victim node's web process `after_s` in, keep
    sending for a few seconds more; count the answers (and of those, the ones sent after the kill: rerouted to a
    replica), the streams that failed mid-answer and the requests refused."""
    headers = {"Authorization": f"Bearer {first.key}"}
    extra = {"ignore_eos": True, "min_tokens": max_tokens}
    samples, stop_at = [], [float("inf")]
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < stop_at[0]:
                samples.append(await one_request(client, first.url, headers, model, i, max_tokens, extra))
                i += clients

        workers = [asyncio.create_task(worker(w)) for w in range(clients)]
        await asyncio.sleep(after_s)
        web = victim.procs[-1]
        web.send_signal(signal.SIGKILL)
        killed = time.perf_counter()  # the clock Sample.sent reads
        stop_at[0] = killed + 3.0
        web.wait(timeout=30)
        refused_s = None if replica_left else await asyncio.to_thread(first_refusal_after, first.url, first.key,
                                                                      model, killed)
        await asyncio.gather(*workers)
    victim_name = victim.node_env["APPLIANCE_NODE"]
    while first.manage("shell", "--no-imports", "-c", NODE_STATE % victim_name).split()[-1] != "down":
        time.sleep(0.2)
    errors = [s.error or "" for s in samples]
    return {"model": model, "killed": victim_name, "clients": clients, "answered": errors.count(""),
            "rerouted": sum(1 for s in samples if not s.error and s.sent > killed),
            "failed_mid_answer": sum(e.startswith("in-stream error") for e in errors),
            "refused_503": sum(e.startswith("HTTP 503") for e in errors),
            "other_errors": sorted({e for e in errors if e and not e.startswith(("in-stream", "HTTP 503"))})[:3],
            "refused_503_after_s": refused_s, "shown_down_after_s": time.perf_counter() - killed}


def print_failover(failover: dict) -> None:
    refusal = ("" if failover["refused_503_after_s"] is None else
               f"; the first 503 came {failover['refused_503_after_s']:.2f}s after the kill")
    print(f"{failover['killed']} killed under {failover['clients']} clients of {failover['model']} through node-1: "
          f"{failover['answered']} answered ({failover['rerouted']} of them sent after the kill), "
          f"{failover['failed_mid_answer']} failed mid-answer, {failover['refused_503']} refused with a 503 "
          f"(other errors: {failover['other_errors']}){refusal}; {failover['killed']} shown down after "
          f"{failover['shown_down_after_s']:.1f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = path_comparison_arguments(__doc__.split("\n\n")[0], argv, ROOT / "bench" / "out")
    work = temp_home()
    first, second, third = nodes = start_nodes(work)
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
        report["failover"] = []
        for victim, model, replica_left in ((third, TWIN, True), (second, MODEL, False)):
            failover = asyncio.run(load_and_kill(first, victim, model, max(args.levels), args.max_tokens,
                                                 after_s=3.0, replica_left=replica_left))
            report["failover"].append(failover)
            print_failover(failover)
    finally:
        for node in nodes:
            node.stop()
    write_report(args.out, "forwarding", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
