"""What a node answers other nodes of its appliance: its engines, for requests another node took.

The node that took a chat request has authenticated the caller, admitted it against the team's quotas, and will
settle its usage and record it in the ledger; it sends here only what the engine needs: the prompt as token ids,
the sampling parameters and the team's prefix-cache scope. This node runs it on its own engine and streams the
engine's chunks back, one JSON line each, as they come. So every API feature works through a forwarded request
exactly as on the node that serves the model, and nothing is charged or recorded twice.

Every call must be signed by a node of this appliance (appliance.node_link); anything else is a 403 naming why.
Every answer is signed too, so the calling node knows that the address it called is a node of this appliance.
Only engines this node loaded itself are reachable: a call never hops on to a third node.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
from pathlib import Path

from django.conf import settings
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from appliance import engine_client, http_limits, node_link
from appliance.importer import store_path
from appliance.modelfiles import OutsideStore, in_store
from appliance.models import ModelVariant
from appliance.names import NAME_MAX
from inference.engine import wire
from inference.engine.request import EngineBusy, EngineClosed, FieldNotHonoured, PromptTooLong

from .settlement import record

log = logging.getLogger(__name__)
PREFIX = "/node/v1/"
# What an engine's refusal at submit travels as: the status, and the kind the calling node raises again.
REFUSAL_STATUS = {"busy": 429, "too_long": 400, "closed": 503, "field": 400, "invalid": 400}


def claims_a_signature(scope) -> bool:
    """Return whether a request is for this module and says it is signed (so that its body is read at all)."""
    return scope["path"].startswith(PREFIX) and bool(http_limits.header(scope, b"x-appliance-signature"))


def refused(message: str, status: int, kind: str = "invalid", param: str | None = None) -> JsonResponse:
    return JsonResponse({"error": {"message": message, "kind": kind, "param": param}}, status=status)


async def unsigned_refusal(request: HttpRequest) -> JsonResponse | None:
    """Return None for a call signed by a node of this appliance, else the 403 that refuses it (recorded)."""
    try:
        node_link.verify(request.method, request.path, request.headers, request.body)
        return None
    except node_link.LinkRefused as exc:
        await record(action="node.call_refused", actor="anonymous", target=request.path[:200], outcome="denied",
                     details={"reason": str(exc), "claimed_node": request.headers.get(node_link.HEADERS[0], "")[:64]})
        return refused(f"Refused: {exc}", 403)


def node_call(method: str):
    """Make a view answer only `method`, and only calls signed by a node of this appliance."""

    def wrap(view):
        @csrf_exempt
        @functools.wraps(view)
        async def checked(request: HttpRequest, name: str, **path_parts):
            if request.method != method:
                return refused(f"Method {request.method} not allowed; use {method}", 405)
            refusal = await unsigned_refusal(request)
            return refusal if refusal is not None else await view(request, name, **path_parts)

        return checked

    return wrap


@node_call("GET")
async def engine_facts(request: HttpRequest, name: str):
    """What the calling node needs to tokenize and bound requests for this node's engine of `name`."""
    engine = engine_client.get(name)
    if engine is None or not engine.alive:
        return refused(f"This node does not serve '{name[:200]}'.", 404, "closed")
    facts = json.dumps({"engine": engine.engine, "exact": engine.exact, "vocab_size": engine.vocab_size,
                        "context_length": engine.context_length, "max_request_tokens": engine.max_request_tokens()})
    return signed_response(HttpResponse(facts, content_type="application/json"), request.path, facts.encode())


@node_call("POST")
async def generate(request: HttpRequest, name: str):
    """{prompt_ids, params, cache_scope}: run it on this node's engine of `name`; stream its chunks back."""
    try:
        sent = json.loads(request.body)
        prompt_ids = [int(t) for t in sent["prompt_ids"]]
        params = wire.params_from(sent["params"])
        scope = sent.get("cache_scope")
    except (ValueError, TypeError, KeyError) as exc:
        return refused(f"Not a generation request: {type(exc).__name__}: {str(exc)[:200]}", 400)
    engine = engine_client.get(name)
    if engine is None:
        return refused(f"This node does not serve '{name[:200]}'.", 503, "closed")
    try:
        handle = engine.submit(prompt_ids, params, cache_scope=scope)
        await handle.accepted()
    except FieldNotHonoured as exc:
        return refused(str(exc), 400, "field", exc.param)
    except (EngineBusy, PromptTooLong, EngineClosed, ValueError) as exc:
        kind = wire.refusal_kind(exc)
        return refused(str(exc), REFUSAL_STATUS[kind], kind)
    response = StreamingHttpResponse(chunk_lines(handle), content_type="application/x-ndjson")
    response["Cache-Control"] = "no-cache"
    return signed_response(response, request.path, b"")  # a stream's body is not known yet: its headers are signed


@node_call("GET")
async def variant_file(request: HttpRequest, name: str, rel: str):
    """One file of this node's ready copy of variant `name`, for a node fetching its own copy (appliance.copies).
    Only the manifest's files of a copy that is ready here are sent; the calling node hashes what it receives
    against the manifest, so the answer's headers are signed and its bytes need not be."""
    opened = await asyncio.to_thread(open_copy_file, name, rel)
    if isinstance(opened, str):
        return refused(opened, 404)
    response = FileResponse(opened, content_type="application/octet-stream")
    return signed_response(response, request.path, b"")


def open_copy_file(name: str, rel: str):
    """Return the open file `rel` of this node's ready copy of `name`, or the reason it cannot be sent."""
    variant = ModelVariant.objects.filter(name=name[:NAME_MAX]).first()
    shown = f"'{name[:64]}'"
    if variant is None:
        return f"No variant {shown}."
    if rel not in variant.manifest:
        return f"{rel[:200]!r} is not a file of {shown}'s manifest."
    if not variant.has_ready_copy(settings.APPLIANCE_NODE):
        return f"This node holds no ready copy of {shown}."
    try:
        path = in_store(Path(settings.MODEL_STORE), str(store_path(variant.name)), *rel.split("/"))
        # The store's files are regular files (links are refused at import and by every hash); O_NOFOLLOW keeps
        # one planted since from being followed.
        return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb")
    except (OutsideStore, OSError) as exc:
        return f"{rel[:200]!r} of {shown} cannot be read here: {exc}"


def signed_response(response: HttpResponse, path: str, body: bytes) -> HttpResponse:
    """Sign an answer as this node's, so the calling node knows it reached a node of this appliance: a Node row
    with a forged address (it takes only database access) cannot draw prompts out to a host without the KEK."""
    for name, value in node_link.sign(node_link.ANSWER, path, body, settings.APPLIANCE_NODE).items():
        response[name] = value
    return response


async def chunk_lines(handle):
    """Yield the engine's chunks as JSON lines; the calling node hanging up cancels the request (handle's loop)."""
    async for chunk in handle:
        yield json.dumps(dataclasses.asdict(chunk), separators=(",", ":")) + "\n"
