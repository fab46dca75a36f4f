"""A variant another node of the appliance serves, as this node's chat API sees it: the interface of EngineClient.

This node tokenizes (from the variant's files in the shared model store), counts and refuses what it can, then
sends the prompt's ids and sampling parameters to the serving node as a signed call (appliance.api.peer) and
reads the chunks it streams back. Everything around the engine — the key, admission, usage, transcripts and the
ledger event — happens here, on the node that took the request, once. The serving node's answers are signed
too (appliance.api.peer): a prompt goes only to an address that proves it is a node of this appliance.

A serving node that cannot be reached before it took the request refuses it as EngineClosed (a 503 naming the
node); one that stops answering mid-request ends it with an error chunk marked unavailable (the API's 503, or an
error event in a stream). Either way the node is reported unreachable (appliance.routing), so requests that
follow go to another node that serves the variant, or are refused at once naming why.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx

from appliance import node_link
from appliance.engine_client import ClientBasics, TaskHandle, loop_client
from inference.engine import wire
from inference.engine.prompt import load_tokenizer
from inference.engine.request import Chunk, EngineClosed, FieldNotHonoured, PromptTooLong, SamplingParams

# Connecting is quick on a working network; reading waits as long as a generation may take (the serving node
# streams a chunk per step), and a node that dies mid-answer closes the connection, which ends the read.
HTTP_TIMEOUT = httpx.Timeout(connect=3.0, read=None, write=30.0, pool=None)
FACTS_TIMEOUT_S = 10.0


class PeerUnreachable(RuntimeError):
    """The serving node did not answer the call for its engine's facts."""


def signed(method: str, url: str, path: str, body: bytes, sender: str) -> dict:
    """Return the request arguments of a signed call to a peer node."""
    return {"method": method, "url": url + path, "content": body,
            "headers": {"Content-Type": "application/json", **node_link.sign(method, path, body, sender)}}


def engine_facts(node: str, address: str, name: str, sender: str) -> dict:
    """Return the serving node's facts of its engine for `name` (vocabulary, limits), or raise PeerUnreachable."""
    node_link.allow_egress_to(address)
    try:
        # trust_env=False: no proxy variable may send a node's call anywhere but the node.
        response = httpx.request(**signed("GET", address, f"/node/v1/engines/{name}", b"", sender),
                                 timeout=FACTS_TIMEOUT_S, trust_env=False)
    except httpx.HTTPError as exc:
        raise PeerUnreachable(f"{type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise PeerUnreachable(f"answered {response.status_code}: {response.text[:200]}")
    answered_by(node, f"/node/v1/engines/{name}", response.headers, response.content)
    return response.json()


def answered_by(node: str, path: str, headers, body: bytes) -> None:
    """Check that an answer is signed by `node` of this appliance; raise PeerUnreachable if not."""
    try:
        sender = node_link.verify(node_link.ANSWER, path, headers, body)
    except node_link.LinkRefused as exc:
        raise PeerUnreachable(f"the answer is not a node's of this appliance: {exc}") from exc
    if sender != node:
        raise PeerUnreachable(f"the answer is signed by node {sender}, not by {node}")


class PeerEngine(ClientBasics):
    """One variant served by another node, reached through that node's signed engine endpoint."""

    def __init__(self, name: str, node: str, address: str, model_dir: Path, facts: dict, sender: str,
                 lost: Callable[[str], None], sent: Callable[[str, int], None]):
        """lost(node) is called when the node stops answering, so routing stops choosing it; sent(node, +1) when a
        request is sent there and sent(node, -1) when it ends, so routing counts what is outstanding there."""
        self.name, self.node, self.url, self.sender = name, node, address, sender
        self._lost, self._sent = lost, sent
        self.engine: str = facts["engine"]
        self.exact: bool = facts["exact"]
        self.vocab_size: int = facts["vocab_size"]
        self.context_length: int = facts["context_length"]
        self._max_request_tokens: int = facts["max_request_tokens"]
        self.tokenizer = load_tokenizer(model_dir)
        self._http: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its AsyncClient

    def submit(self, prompt_ids: Iterable[int], params: SamplingParams = SamplingParams(),
               cache_scope: str | None = None) -> "PeerHandle":
        """Send a request from inside a running event loop; `await handle.accepted()` before reading its chunks."""
        prompt_ids = [int(t) for t in prompt_ids]
        if prompt_ids and len(prompt_ids) + params.max_tokens > self._max_request_tokens:
            raise PromptTooLong(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                                f"exceeds this deployment's limit of {self._max_request_tokens} tokens")
        body = json.dumps({"prompt_ids": prompt_ids, "params": wire.params_fields(params),
                           "cache_scope": cache_scope}).encode()
        path = f"/node/v1/engines/{self.name}/generate"
        return PeerHandle(self._client(), signed("POST", self.url, path, body, self.sender), path, self.node,
                          self._lost, self._sent)

    def _client(self) -> httpx.AsyncClient:
        return loop_client(self._http, timeout=HTTP_TIMEOUT)


class PeerHandle(TaskHandle):
    """A request sent to another node: `await accepted()`, then `async for` yields its Chunks; leaving early
    closes the connection, and the serving node cancels the request."""

    def __init__(self, http: httpx.AsyncClient, call: dict, path: str, node: str, lost: Callable[[str], None],
                 sent: Callable[[str, int], None]) -> None:
        self.path, self.node, self._lost = path, node, lost
        super().__init__(lambda: self._run(http, call))
        # Counted from now, not from when the task first runs: the next request's choice must see this one. The
        # task's end (even a cancel before it ran) uncounts it.
        sent(node, 1)
        self._task.add_done_callback(lambda _: sent(node, -1))

    async def _run(self, http: httpx.AsyncClient, call: dict) -> None:
        try:
            await self._stream(http, call)
        except httpx.HTTPError as exc:
            self._lost(self.node)
            if not self.answer.done():
                self._settle(EngineClosed(f"node {self.node}, which serves this model, cannot be reached "
                                          f"({type(exc).__name__})"))
            else:
                self._end(f"node {self.node}, which served this request, stopped answering ({type(exc).__name__})")
        except asyncio.CancelledError:
            self._settle(EngineClosed("the request was cancelled before the serving node took it"))
            raise

    _last = Chunk("", None, 0, 0)  # the latest chunk read: a failure ends the request with its token counts

    async def _stream(self, http: httpx.AsyncClient, call: dict) -> None:
        async with http.stream(**call) as response:
            if response.status_code != 200:
                self._settle(refusal(response.status_code, await response.aread(), self.node))
                return
            try:
                answered_by(self.node, self.path, response.headers, b"")
            except PeerUnreachable as exc:
                self._lost(self.node)
                self._settle(EngineClosed(f"node {self.node} cannot serve this request: {exc}"))
                return
            self._settle(None)
            async for line in response.aiter_lines():
                if line:
                    self._last = Chunk(**json.loads(line))
                    self.chunks.put_nowait(self._last)
        if self._last.finish_reason is None:
            self._end(f"node {self.node} ended the stream before the answer finished")

    def _end(self, error: str) -> None:
        self.chunks.put_nowait(dataclasses.replace(self._last, text="", finish_reason="error", error=error,
                                                   logprobs=None, unavailable=True))


def refusal(status: int, body: bytes, node: str) -> Exception:
    """Return the exception the serving node's refusal stands for (as the engine there raised it)."""
    try:
        detail = json.loads(body)["error"]
        kind, message, param = detail.get("kind"), str(detail.get("message", "")), detail.get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        kind, message, param = None, body.decode(errors="replace")[:300], None
    if kind == "field":
        return FieldNotHonoured(message, param or "")
    if kind in wire.REFUSALS and kind != "invalid":  # as the engine's own wire names them; "invalid" is a bug here
        return wire.REFUSALS[kind](message)
    return RuntimeError(f"node {node} refused the forwarded request ({status}): {message}")
