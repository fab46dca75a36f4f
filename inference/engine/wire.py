"""The wire between the web process and an engine process: length-prefixed msgpack frames on a socketpair.

A socketpair has no name on disk and no port, so nothing else on the box can connect to an engine: only the
web process that started it holds the other end. Each frame is one message, a list whose first item names
it. Web → engine: ["submit", id, prompt_ids, params, options], ["cancel", id], ["close"]. Engine → web:
["ready", info], ["accepted", id], ["refused", id, kind, message], ["chunks", [[id, *chunk fields], ...]]
(every chunk of one step in one frame), ["stats", describe, telemetry], ["failed", message].

Requests and chunks travel as plain fields (dataclasses.asdict / astuple): both ends run the same code.
"""

from __future__ import annotations

import dataclasses
import struct

import msgpack

from inference.engine.request import Chunk, EngineBusy, EngineClosed, PromptTooLong, SamplingParams

HEADER = struct.Struct("!I")
MAX_FRAME_BYTES = 256 * 1024 * 1024  # a frame claiming more is a broken peer, not a message
# The refusals Engine.submit raises, by the name they travel under; anything else is "invalid".
REFUSALS = {"busy": EngineBusy, "too_long": PromptTooLong, "closed": EngineClosed, "invalid": ValueError}
REFUSAL_KINDS = {cls: kind for kind, cls in REFUSALS.items()}


class WireError(RuntimeError):
    """The peer sent something that is not a frame of this protocol."""


def frame(message: list) -> bytes:
    """Return one message as a frame: its length, then its msgpack bytes."""
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def body_length(header: bytes) -> int:
    """Return the length a frame header announces, refusing absurd ones."""
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise WireError(f"a frame of {length} bytes is over the {MAX_FRAME_BYTES}-byte limit")
    return length


def message(body: bytes) -> list:
    """Return the message a frame's body carries."""
    decoded = msgpack.unpackb(body, raw=False, strict_map_key=False)
    if not isinstance(decoded, list) or not decoded or not isinstance(decoded[0], str):
        raise WireError(f"not a message: {str(decoded)[:100]}")
    return decoded


def params_fields(params: SamplingParams) -> dict:
    return dataclasses.asdict(params)


def params_from(fields: dict) -> SamplingParams:
    """Rebuild SamplingParams; msgpack turns tuples into lists, so tuple fields are tuples again."""
    tuples = {f.name for f in dataclasses.fields(SamplingParams) if f.type.startswith("tuple")}
    return SamplingParams(**{k: tuple(v) if k in tuples else v for k, v in fields.items()})


def chunk_fields(request_id: str, chunk: Chunk) -> list:
    return [request_id, *dataclasses.astuple(chunk)]


def chunk_from(fields: list) -> tuple[str, Chunk]:
    return fields[0], Chunk(*fields[1:])


def refusal_kind(exc: Exception) -> str:
    return next((kind for cls, kind in REFUSAL_KINDS.items() if type(exc) is cls), "invalid")
