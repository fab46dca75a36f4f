"""A small ledger history with checkpoints (seconds apart if asked), and tools to tamper with bundles."""
import json
import time
import zipfile
from pathlib import Path

from audit import keys
from audit.checkpoints import make_checkpoint
from audit.ledger import append
from audit.models import Checkpoint

TEAMS = ["research", "sales", "legal"]


def tick() -> None:
    """Sleep to just past the next whole second, so the next checkpoint falls in a later second."""
    time.sleep(1.05 - time.time() % 1)


def chat(count: int, start: int = 0) -> None:
    """Append count chat.completion events."""
    for index in range(start, start + count):
        append("chat.completion", actor=f"team:{TEAMS[index % 3]}", target="tiny",
               details={"model": "tiny", "prompt_tokens": 10 + index, "completion_tokens": 3})


def history(settings, seconds_apart: bool = False) -> int:
    """Append the key, 12 chat events and a heartbeat after every fourth; return the last heartbeat's time.

    With seconds_apart the heartbeats land in successive seconds or later, and AUDIT_MAX_GAP_S is set to
    the largest gap between them as they happened: removing one then always leaves a gap too long,
    however slow the machine was (a fixed 1 s allowance failed when a step took longer under load).
    """
    settings.AUDIT_MAX_GAP_S = 3600
    keys.active_key()  # event 1 records the key's creation; chat events are 2..13
    for batch in range(3):
        chat(4, start=4 * batch)
        if seconds_apart:
            tick()
        make_checkpoint("heartbeat")
    times = [int(cp.created_at.timestamp()) for cp in Checkpoint.objects.order_by("id")]
    if seconds_apart:
        settings.AUDIT_MAX_GAP_S = max(later - earlier for earlier, later in zip(times, times[1:]))
    return times[-1]


def rewrite(bundle: Path, name: str, change) -> Path:
    """Return a copy of bundle in which member name is replaced by change(its bytes)."""
    out = bundle.with_name(f"tampered-{bundle.name}")
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            dst.writestr(item.filename, change(data) if item.filename == name else data)
    return out


def change_lines(change):
    """Return a transform of events.jsonl that passes its lines (without newlines) through change."""
    def transform(data: bytes) -> bytes:
        lines = change(data.split(b"\n")[:-1])
        return b"".join(line + b"\n" for line in lines)
    return transform


def change_json(change):
    """Return a transform of a JSON member that passes the parsed value through change."""
    return lambda data: json.dumps(change(json.loads(data))).encode()
