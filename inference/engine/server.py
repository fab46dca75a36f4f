"""The engine process's loop: requests arrive on the wire, the engine runs them, every step's chunks go back.

The process holds one deployment's weights and does nothing else: no HTTP, no database work on its hot path,
so the engine's step loop has the interpreter lock almost to itself. An asyncio loop on the main thread reads
frames from the web process, submits requests to the engine, and writes each step's chunks back as one frame;
the engine's own worker thread runs the steps. When the web process goes away (its end of the socketpair
closes, whatever killed it), the engine is closed and the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

from inference.engine import wire
from inference.engine.config import EngineConfig
from inference.engine.core import Engine
from inference.fit import measure_kv_bytes_per_token, measure_weights

log = logging.getLogger(__name__)
STATS_INTERVAL_S = 0.5  # how often the web process's view of queue depth, KV use and MoE telemetry is refreshed


def measured_allocation(engine) -> dict:
    """Return what the loaded model really holds (parameters, weight bytes, KV bytes per token), for the console."""
    model = engine.model
    return {
        "parameters": engine.parameter_count,
        "weights": measure_weights(model),
        "kv": measure_kv_bytes_per_token(model, engine.tokenizer),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def ready_info(engine) -> dict:
    """Return the figures the web process needs before its first request: limits, device, allocation."""
    try:
        measured = measured_allocation(engine)
    except Exception as exc:  # a measurement is evidence for the console, never a reason not to serve
        log.exception("measuring the loaded model failed")
        measured = {"error": f"{type(exc).__name__}: {exc}"}
    return {"device": engine.device, "exact": engine.exact, "context_length": engine.context_length,
            "max_request_tokens": engine.max_request_tokens(), "vocab_size": engine.vocab_size,
            "measured": measured, "figures": engine.describe(), "telemetry": engine.telemetry()}


class EngineServer:
    """Serve one engine to the web process at the other end of `sock`."""

    def __init__(self, engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.engine = engine
        self.reader, self.writer = reader, writer
        self.handles: dict[str, object] = {}
        self.outbox: list[list] = []
        self.flush_scheduled = False

    def send(self, message: list) -> None:
        self.writer.write(wire.frame(message))

    async def run(self) -> None:
        """Serve until the web process closes its end or says close."""
        stats = asyncio.create_task(self.publish_stats())
        try:
            while (message := await self.next_message()) is not None:
                kind = message[0]
                if kind == "submit":
                    self.submit(*message[1:])
                elif kind == "cancel":
                    handle = self.handles.get(message[1])
                    if handle is not None:
                        handle.cancel()
                elif kind == "close":
                    break
                else:
                    raise wire.WireError(f"unknown message {kind!r}")
                await self.writer.drain()
        finally:
            stats.cancel()

    async def next_message(self) -> list | None:
        try:
            header = await self.reader.readexactly(wire.HEADER.size)
            return wire.message(await self.reader.readexactly(wire.body_length(header)))
        except asyncio.IncompleteReadError:
            return None  # the web process closed its end, or died

    def submit(self, request_id: str, prompt_ids: list, params: dict, options: dict) -> None:
        try:
            handle = self.engine.submit(prompt_ids, wire.params_from(params), **options)
        except Exception as exc:  # the engine's refusals travel back by name (busy → 429, too long → 400, ...)
            self.send(["refused", request_id, wire.refusal_kind(exc), str(exc)])
            return
        self.handles[request_id] = handle
        self.send(["accepted", request_id])
        asyncio.get_running_loop().create_task(self.pump(request_id, handle))

    async def pump(self, request_id: str, handle) -> None:
        """Move one request's chunks to the outbox; one frame per loop turn carries every request's chunks."""
        try:
            async for chunk in handle:
                self.outbox.append(wire.chunk_fields(request_id, chunk))
                if not self.flush_scheduled:
                    self.flush_scheduled = True
                    asyncio.get_running_loop().call_soon(self.flush)
        finally:
            self.handles.pop(request_id, None)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.outbox:
            outbox, self.outbox = self.outbox, []
            self.send(["chunks", outbox])

    async def publish_stats(self) -> None:
        while True:
            self.send(["stats", self.engine.describe(), self.engine.telemetry()])
            await self.writer.drain()
            await asyncio.sleep(STATS_INTERVAL_S)


async def serve_async(sock: socket.socket, model_dir: Path, config: EngineConfig, process: dict) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=wire.MAX_FRAME_BYTES)
    try:
        engine = Engine(model_dir, config)
    except Exception as exc:
        writer.write(wire.frame(["failed", f"{type(exc).__name__}: {exc}"]))
        await writer.drain()
        raise
    try:
        writer.write(wire.frame(["ready", {**ready_info(engine), "process": process}]))
        await writer.drain()
        await EngineServer(engine, reader, writer).run()
    finally:
        engine.close()
        writer.close()


def serve(sock: socket.socket, model_dir: Path, config: EngineConfig, process: dict | None = None) -> None:
    """Load the model and serve it on sock until the web process goes away.

    `process` describes the process itself (its pid, what its guard enforces); it is sent with the ready
    message for the web process to record.
    """
    asyncio.run(serve_async(sock, Path(model_dir), config, process or {}))
