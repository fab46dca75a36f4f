"""The one definition of the canonical bytes that the audit ledger hashes.

Sorted keys, no whitespace, UTF-8 without escaping. Only integers, strings,
booleans, null, lists and string-keyed objects are allowed: floats have no
single textual form across languages (1e3, 1000.0, 1000), so a verifier written
elsewhere could not reproduce the bytes, and NUL characters cannot be stored in
PostgreSQL text or jsonb, so an event that fits SQLite would not fit there.
"""
import json
from datetime import datetime, timezone
from typing import Any


def canonical_bytes(obj: Any) -> bytes:
    """Return the canonical UTF-8 JSON bytes of obj; raise ValueError on floats and the like."""
    _check(obj, "$")
    return json_bytes(obj)


def json_bytes(obj: Any) -> bytes:
    """Return obj in the canonical layout without its checks: for data the box keeps encrypted and reads back
    itself (transcripts, stored responses), never hashed or signed, where a NUL a user typed is text like any
    other."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _check(value: Any, path: str) -> None:
    """Raise ValueError naming the path of the first value the canonical form cannot hold."""
    # bool is a subclass of int, so it passes with the integers.
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{path}: NUL characters are not allowed in audit data")
        return
    if isinstance(value, float):
        raise ValueError(
            f"{path}: floats are not allowed in audit data ({value!r}); "
            "store an integer (e.g. milliseconds) or a string"
        )
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check(item, f"{path}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            # json.dumps would turn 1 into "1" silently, so the stored event
            # would not say what the caller passed.
            if not isinstance(key, str):
                raise ValueError(f"{path}: key {key!r} is not a string")
            _check(key, f"{path}.{key}")
            _check(item, f"{path}.{key}")
        return
    raise ValueError(f"{path}: {type(value).__name__} is not allowed in audit data")


def canonical_time(moment: datetime) -> str:
    """Return moment as ISO-8601 UTC with microseconds and a Z suffix."""
    if moment.tzinfo is None:
        raise ValueError("audit times must be timezone-aware")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
