"""Which node serves a chat request for a variant this node has not loaded: routing between the appliance's nodes.

A node serves a variant when its last heartbeat says so (Node.serving) and it is up. Of those, the one with the
fewest requests outstanding goes first: what its heartbeat reported plus what this node has sent it since. A node
whose call failed is left out for UNREACHABLE_S, so the requests that follow do not wait on it again; once its
heartbeats stop it is down for every node anyway.

The PeerEngine of each (variant, node) is made once, when first needed (its tokenizer load and a call for the
serving engine's facts take a moment), and dropped when that node restarts or becomes unreachable.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from . import copies
from .copies import CopyFailed
from .importer import store_path
from .modelfiles import OutsideStore
from .models import DesiredState, Deployment, ModelVariant, Node, NodeState
from .names import InvalidName
from .peer_engine import PeerEngine, PeerUnreachable, engine_facts

log = logging.getLogger(__name__)
UNREACHABLE_S = 10.0
_lock = threading.Lock()
_peers: dict[tuple[str, str, str], PeerEngine] = {}  # (variant, node, node's start) -> its engine here
_unreachable: dict[str, float] = {}  # node -> until when it is left out
_sent: Counter = Counter()  # node -> requests this node has in flight on it


def lost(node: str) -> None:
    """Leave `node` out of routing for a while and forget its engines: a call to it just failed."""
    with _lock:
        _unreachable[node] = time.monotonic() + UNREACHABLE_S
        for key in [key for key in _peers if key[1] == node]:
            del _peers[key]
    log.warning("node %s stopped answering; requests are not routed to it for %.0fs", node, UNREACHABLE_S)


def _reachable(node: str) -> bool:
    with _lock:
        return _unreachable.get(node, 0.0) <= time.monotonic()


def serving_nodes(model: str | None = None) -> list[Node]:
    """Return the other up nodes that serve `model` (any variant, for None), fewest requests outstanding first."""
    now = timezone.now()
    nodes = [node for node in Node.objects.exclude(name=settings.APPLIANCE_NODE)
             if node.state(now) == NodeState.UP and (model is None or model in node.serving)
             and _reachable(node.name)]
    with _lock:
        return sorted(nodes, key=lambda node: (node.outstanding + _sent[node.name], node.name))


def served_elsewhere() -> set[str]:
    """Return the variants other up nodes serve (for /v1/models: the appliance's, not this node's alone)."""
    return {name for node in serving_nodes() for name in node.serving}


def route(model: str) -> Node | None:
    """Return the node to send a request for `model` to, or None (runs on the gatekeeper thread: it reads the
    database)."""
    nodes = serving_nodes(model)
    if not nodes or not Deployment.objects.filter(variant__name=model, desired=DesiredState.DEPLOYED).exists():
        return None
    return nodes[0]


def tokenizer_dir(model: str, node: Node) -> Path:
    """Return where this node reads the variant's tokenizer: its ready copy, else the files other than weights,
    fetched from the serving node once (appliance.copies)."""
    variant = ModelVariant.objects.get(name=model)
    if variant.has_ready_copy(settings.APPLIANCE_NODE) or (
            not variant.copies.filter(node=settings.APPLIANCE_NODE).exists()
            and (store_path(model) / "config.json").is_file()):  # a store from before copies were recorded
        return store_path(model)
    return copies.tokenizer_dir(variant, node)


def peer_engine(node: Node, model: str) -> PeerEngine | None:
    """Return the PeerEngine for `model` on `node`, made on first use (call it off the event loop); None when the
    node does not answer, or this node cannot read the variant's tokenizer."""
    key = (model, node.name, node.started_at.isoformat())
    with _lock:
        engine = _peers.get(key)
    if engine is not None:
        return engine
    try:
        model_dir = tokenizer_dir(model, node)
    except (InvalidName, OutsideStore, CopyFailed, OSError) as exc:
        log.warning("node %s serves %s, but this node cannot read its tokenizer: %s", node.name, model, exc)
        return None
    try:
        facts = engine_facts(node.name, node.address, model, settings.APPLIANCE_NODE)
    except PeerUnreachable as exc:
        log.warning("node %s did not answer for its engine of %s: %s", node.name, model, exc)
        lost(node.name)
        return None
    engine = PeerEngine(model, node.name, node.address, model_dir, facts, settings.APPLIANCE_NODE, lost, sent)
    with _lock:
        return _peers.setdefault(key, engine)


async def engine_for(model: str, on_gate) -> PeerEngine | None:
    """Return an engine on another node that serves `model`, or None."""
    node = await on_gate(route, model)
    if node is None:
        return None
    return await asyncio.to_thread(peer_engine, node, model)


def sent(node: str, change: int) -> None:
    """Count a request sent to a node (+1) or ended there (-1): routing's least-outstanding choice."""
    with _lock:
        _sent[node] += change
