"""Measure ledger append latency in-process on SQLite, and the audit work a chat request adds.

    .venv/bin/python bench/ledger_append.py [--events 2000]

Uses a throwaway APPLIANCE_HOME under /tmp, so it never touches a box's ledger.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["APPLIANCE_HOME"] = tempfile.mkdtemp(prefix="bench-ledger-")
os.environ.pop("DATABASE_URL", None)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")


def percentile(samples: list[float], q: float) -> float:
    """Return the q-th percentile of samples (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def main() -> None:
    """Append events one by one, timing each, then time the digests a chat request computes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from audit.ledger import append, digest

    prompt = "Summarise the quarterly figures for the board. " * 20
    details = {"key": "ab12cd", "model": "demo-dense", "prompt_tokens": 240, "completion_tokens": 120,
               "finish_reason": "stop", "duration_ms": 812}
    append("bench.warmup", actor="bench:ledger")
    samples = []
    for _ in range(args.events):
        started = time.perf_counter()
        append("chat.completion", actor="team:bench", target="demo-dense",
               details={**details, "prompt_digest": digest(prompt), "completion_digest": digest(prompt[:400])})
        samples.append((time.perf_counter() - started) * 1000)
    digests = []
    for _ in range(args.events):
        started = time.perf_counter()
        digest(prompt)
        digest(prompt[:400])
        digests.append((time.perf_counter() - started) * 1000)
    print(f"ledger append on SQLite (WAL, synchronous=NORMAL), {args.events} events, incl. 2 HMAC digests:")
    print(f"  p50 {statistics.median(samples):.3f} ms   p90 {percentile(samples, 90):.3f} ms   "
          f"p99 {percentile(samples, 99):.3f} ms   max {max(samples):.3f} ms")
    print(f"  the two HMAC digests alone: p50 {statistics.median(digests) * 1000:.1f} us")
    print("  audit work added to one chat request = one append (both digests included): "
          f"p50 {statistics.median(samples):.3f} ms (target <= 2 ms)")


if __name__ == "__main__":
    main()
