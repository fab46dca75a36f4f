"""Calls between the nodes of one appliance: how they are signed, checked, and let through the egress guard.

A node that takes a chat request for a model another node serves sends it there as a signed call, and the node
that answers signs its answer. The key is
derived from the appliance's KEK (which every node of an appliance shares already, for the ledger's digests), so
no new secret has to be handed around, and nothing without the KEK can make one node act for another. Each call
signs its method, path, sender, time, a one-time nonce and the body's hash; the receiver refuses a call whose
signature does not match, whose time is more than SKEW_S away from its own clock, or whose nonce it has seen.

Forwarding is outbound traffic, so each peer's address is added to this process's egress allowlist explicitly,
as host:port, when this node first calls it (an egress.policy_changed event): the guard still refuses every other
destination.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from urllib.parse import urlsplit

from audit import egress, kek

# The method an answer is signed under: a node's answer can never pass for a call, nor a call for an answer.
ANSWER = "ANSWER"
SKEW_S = 30  # the nodes' clocks agree to well within this (NTP, as the beat lease needs too)
HEADERS = ("X-Appliance-Node", "X-Appliance-Time", "X-Appliance-Nonce", "X-Appliance-Signature")
_SEEN_MAX = 100_000
_seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it stops mattering (its time + SKEW_S)
_seen_lock = threading.Lock()
_egress_lock = threading.Lock()


class LinkRefused(Exception):
    """A node-to-node call that is not signed by a node of this appliance; the message says what is wrong."""


def _key() -> bytes:
    return kek.derived_key("node link")


def _signature(method: str, path: str, sender: str, stamp: str, nonce: str, body: bytes) -> str:
    message = "\n".join((method.upper(), path, sender, stamp, nonce, hashlib.sha256(body).hexdigest()))
    return hmac.new(_key(), message.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


def sign(method: str, path: str, body: bytes, sender: str) -> dict[str, str]:
    """Return the headers that make a call from node `sender` one the receiving node accepts."""
    stamp, nonce = str(int(time.time())), secrets.token_hex(16)
    return dict(zip(HEADERS, (sender, stamp, nonce, _signature(method, path, sender, stamp, nonce, body))))


def verify(method: str, path: str, headers, body: bytes) -> str:
    """Return the sending node's name of a correctly signed, fresh, first-seen call; else raise LinkRefused."""
    sender, stamp, nonce, signature = (headers.get(name, "") for name in HEADERS)
    if not (sender and stamp and nonce and signature):
        raise LinkRefused("not a node-to-node call: the node signature headers are missing")
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > SKEW_S:
        raise LinkRefused(f"the call's time {stamp[:20]!r} is more than {SKEW_S}s from this node's clock")
    if not hmac.compare_digest(signature, _signature(method, path, sender, stamp, nonce, body)):
        raise LinkRefused("the call's signature does not match: it was not sent by a node of this appliance")
    with _seen_lock:
        now = time.time()
        while _seen and (next(iter(_seen.values())) < now or len(_seen) >= _SEEN_MAX):
            _seen.popitem(last=False)
        if nonce in _seen:
            raise LinkRefused("the call was replayed: its nonce was used already")
        _seen[nonce] = int(stamp) + SKEW_S
    return sender


def allow_egress_to(address: str) -> None:
    """Add a peer node's host:port (from its http://HOST:PORT address) to this process's egress allowlist, unless
    the allowlist already lets it through."""
    parts = urlsplit(address)
    host, port = parts.hostname, parts.port
    view = egress.guard()
    if view is None or host is None or view.allows_address(host, port):
        return
    with _egress_lock:
        policy = view.policy
        if policy.allows_address(host, port):
            return
        entry = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        egress.set_policy(egress.parse_allowlist([*policy.describe(), entry], f"{policy.source}; peer nodes"))
