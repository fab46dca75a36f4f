"""Worker-side: fetch this node's copy of a variant's files from a node whose copy is ready, and remove copies.

Nodes of one appliance need not share a file system: each keeps the variants it serves in its own model store.
When the reconciler finds a variant placed on this node with no files here, it asks this node's worker for a copy
(actions.do_request_copy). The worker fetches every file of the manifest from a node whose copy is ready,
as signed node-to-node calls (appliance.api.peer.variant_file) answered by that node, hashing each file as it
writes it into .incoming/ and comparing it with the one manifest. Only a copy whose every file matches moves
into place, so a node that lies, a file altered on the way, or a disk that fills leaves nothing half-written in
the store; the copy is failed naming the file and the node. The bytes a source sends are bounded by the
variant's size, so a lying node cannot fill this node's disk either.

Where the nodes do share a store, the files are there already: the copy is then the check of them.

A node that only forwards requests for a variant (it tokenizes; the serving node runs the engine) fetches the
variant's files other than its weights the same way, into .tokenizers/ (tokenizer_dir).
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import httpx
from django.conf import settings
from django.utils import timezone

from . import actions, node_link
from .importer import ACTOR, NotEnoughSpace, check_space, check_store, store_path
from .incoming import INCOMING
from .modelfiles import HASH_CHUNK, in_store, make_store_dir, remove_in_store
from .models import CopyState, ModelVariant, Node, NodeState
from .names import check_name
from .peer_engine import PeerUnreachable, answered_by, signed

log = logging.getLogger(__name__)
# A file's bytes come as fast as the source's disk and the link allow; a source silent this long has stopped.
HTTP_TIMEOUT = httpx.Timeout(connect=3.0, read=60.0, write=30.0, pool=None)
PROGRESS_EVERY_S = 5.0
# A started copy whose progress is older than this lost its worker (killed mid-copy): the reconciler asks again.
STALLED_AFTER_S = 3 * 60.0


# A node whose heartbeat says it is down may only be late (a box busy enough to miss a few beats still answers): it
# is tried, after the others. When every source refuses the connection, the worker asks them again every
# SOURCE_RETRY_S for up to SOURCE_WAIT_S (a source restarting comes back within that), then fails the copy.
SOURCE_WAIT_S = 60.0
SOURCE_RETRY_S = 3.0


class CopyFailed(Exception):
    """A copy from one source node did not give the manifest's files; the message names the file and the node."""


class SourceUnreachable(CopyFailed):
    """No connection to the source node could be made, so nothing came from it: it may answer a moment later."""


def file_path(name: str, rel: str) -> str:
    """Return the node-link path of one file of a variant (what the call signs: its unquoted form)."""
    return f"/node/v1/variants/{name}/files/{rel}"


def sources(variant: ModelVariant) -> list[Node]:
    """Return the other nodes whose copy of the variant is ready: up ones first, then stale, then down ones (see
    SOURCE_WAIT_S: one that is really down costs a refused or timed-out connection)."""
    ready = set(variant.copies.filter(state=CopyState.READY).exclude(node=settings.APPLIANCE_NODE)
                .values_list("node", flat=True))
    now, order = timezone.now(), {NodeState.UP: 0, NodeState.STALE: 1, NodeState.DOWN: 2}
    return sorted(Node.objects.filter(name__in=ready).order_by("name"), key=lambda node: order[node.state(now)])


def run_copy(variant_id: int, replace: bool = False) -> None:
    """Give this node a copy of the variant's files that matches its manifest, and record how that went; with
    replace, remove the copy this node holds first."""
    variant = ModelVariant.objects.filter(pk=variant_id).first()
    if variant is None:
        return
    me, started = settings.APPLIANCE_NODE, time.monotonic()
    final = store_path(variant.name)
    if final.is_dir() and not replace:  # a store shared with the node that imported it, or a copy made before
        problems = check_store(variant)
        if problems:
            actions.do_quarantine(variant_id, problems, node=me, actor=ACTOR)
        else:
            actions.do_record_verified(variant_id, node=me, actor=ACTOR)
        return
    while True:
        source, size, problems, unreachable = copy_from_any(variant, final)
        if source is not None:
            actions.do_record_copy(variant_id, node=me, source=source.name, size_bytes=size,
                                   duration_ms=int((time.monotonic() - started) * 1000), actor=ACTOR)
            return
        if not unreachable or time.monotonic() - started >= SOURCE_WAIT_S:
            break
        actions.do_record_copy_progress(variant_id, node=me,
                                        detail=f"waiting for a node with a ready copy to answer: {'; '.join(problems)}")
        time.sleep(SOURCE_RETRY_S)
    problem = "; ".join(problems) or "no other node of the appliance holds a ready copy of its files"
    actions.do_record_copy(variant_id, node=me, source="", problem=problem,
                           duration_ms=int((time.monotonic() - started) * 1000), actor=ACTOR)


def copy_from_any(variant: ModelVariant, final: Path) -> tuple[Node | None, int, list[str], bool]:
    """Copy the variant from the first source that gives it whole; return (that source, its bytes, what each
    source before it did wrong, whether every one of them was unreachable rather than wrong)."""
    problems, errors = [], []
    for source in sources(variant):
        try:
            return source, copy_from(variant, source, final), problems, False
        except (CopyFailed, NotEnoughSpace, OSError) as exc:
            log.warning("copying %s from node %s failed: %s", variant.name, source.name, exc)
            problems.append(f"from {source.name}: {exc}")
            errors.append(exc)
    return None, 0, problems, bool(errors) and all(isinstance(exc, SourceUnreachable) for exc in errors)


def copy_from(variant: ModelVariant, source: Node, final: Path) -> int:
    """Fetch every manifest file from `source` into a partial copy, then move it into place (in place of the copy
    being replaced, if any: that one is removed only once the new one is whole); return its bytes."""
    store = Path(settings.MODEL_STORE)
    make_store_dir(store)
    check_space(variant.size_bytes, store)
    for parts in ((INCOMING,), (INCOMING, variant.name)):
        make_store_dir(in_store(store, *parts))
    for stale in in_store(store, INCOMING, variant.name).glob("copy-*"):  # a worker killed mid-copy left these
        if time.time() - stale.stat().st_mtime > STALLED_AFTER_S:
            remove_in_store(store, INCOMING, variant.name, stale.name)
    attempt = f"copy-{secrets.token_hex(8)}"
    work = in_store(store, INCOMING, variant.name, attempt)
    make_store_dir(work, exist_ok=False)
    try:
        size = fetch_files(variant, source, variant.manifest, work, Progress(variant, source))
        if final.is_dir():  # the copy being replaced moves aside first: a rename cannot land on a full directory
            final.replace(in_store(store, INCOMING, variant.name, f"{attempt}-replaced"))
        work.replace(final)
        return size
    finally:
        remove_in_store(store, INCOMING, variant.name, attempt)  # gone already when it moved into place
        remove_in_store(store, INCOMING, variant.name, f"{attempt}-replaced")


def fetch_files(variant: ModelVariant, source: Node, files: dict[str, str], work: Path,
                progress=lambda done: None) -> int:
    """Fetch `files` ({relative path: sha256}) of the variant from `source` into work; return the bytes written.
    progress(bytes so far) is called after each chunk."""
    node_link.allow_egress_to(source.address)
    budget = variant.size_bytes  # what the source may send in all
    with httpx.Client(timeout=HTTP_TIMEOUT, trust_env=False) as client:  # no proxy variable redirects it
        for rel, digest in sorted(files.items()):
            budget -= fetch_file(client, variant.name, source, rel, digest, work, budget,
                                 lambda size: progress(variant.size_bytes - budget + size))
    return variant.size_bytes - budget


class Progress:
    """Report a copy's bytes every PROGRESS_EVERY_S, which keeps the copy alive in the reconciler's eyes."""

    def __init__(self, variant: ModelVariant, source: Node):
        self.variant, self.source, self.last = variant, source, 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        total = max(self.variant.size_bytes, 1)
        actions.do_record_copy_progress(self.variant.pk, node=settings.APPLIANCE_NODE,
                                        detail=f"copying from {self.source.name}: {done / 1e9:.2f} of "
                                               f"{total / 1e9:.2f} GB ({100 * done // total}%)")


def fetch_file(client: httpx.Client, name: str, source: Node, rel: str, digest: str, work: Path,
               budget: int, progress=lambda size: None) -> int:
    """Write one file from `source` under work, checking its hash against the manifest's; return its size."""
    relative = PurePosixPath(rel)
    if relative.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        raise CopyFailed(f"the manifest's path {rel!r} is not a relative path inside the variant")
    target = work.joinpath(*relative.parts)
    make_store_dir(target.parent)
    path = file_path(name, rel)
    sha256, size = hashlib.sha256(), 0
    try:
        with client.stream(**signed("GET", source.address, quote(path), b"", settings.APPLIANCE_NODE)) as answer:
            if answer.status_code != 200:
                raise CopyFailed(f"{rel}: node {source.name} answered {answer.status_code}: "
                                 f"{answer.read()[:200].decode(errors='replace')}")
            answered_by(source.name, path, answer.headers, b"")
            with open(target, "xb") as out:
                for chunk in answer.iter_bytes(HASH_CHUNK):
                    size += len(chunk)
                    if size > budget:
                        raise CopyFailed(f"{rel}: node {source.name} sent more than the variant's "
                                         f"{name} size in all")
                    sha256.update(chunk)
                    out.write(chunk)
                    progress(size)
                out.flush()
                os.fsync(out.fileno())
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise SourceUnreachable(f"{rel}: node {source.name}: {type(exc).__name__}: {exc}") from exc
    except (httpx.HTTPError, PeerUnreachable) as exc:
        raise CopyFailed(f"{rel}: node {source.name}: {type(exc).__name__}: {exc}") from exc
    if sha256.hexdigest() != digest:
        raise CopyFailed(f"{rel} from node {source.name} has sha256 {sha256.hexdigest()[:12]}…, "
                         f"the manifest says {digest[:12]}…")
    return size


# Where a node that forwards requests for a variant it holds no copy of keeps that variant's tokenizer and configs
# (it tokenizes, the serving node runs the engine): a folder per variant and set of files, nothing ever served.
TOKENIZERS = ".tokenizers"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def tokenizer_dir(variant: ModelVariant, source: Node) -> Path:
    """Return this node's folder of the variant's files other than its weights, fetched from `source` (the node
    that serves it) and hashed against the manifest on first use; raise CopyFailed naming what went wrong."""
    small = {rel: digest for rel, digest in variant.manifest.items() if not rel.endswith(WEIGHT_SUFFIXES)}
    # Named by the files' hashes, so a variant imported again under the name gets a folder of its own.
    tag = hashlib.sha256("\n".join(f"{rel} {digest}" for rel, digest in sorted(small.items())).encode()).hexdigest()
    store = Path(settings.MODEL_STORE)
    final = in_store(store, TOKENIZERS, f"{check_name(variant.name, field='variant name')}-{tag[:16]}")
    if final.is_dir():
        return final
    make_store_dir(store)
    make_store_dir(in_store(store, TOKENIZERS))
    work = in_store(store, TOKENIZERS, f".{final.name}-{secrets.token_hex(8)}")
    make_store_dir(work, exist_ok=False)
    try:
        fetch_files(variant, source, small, work)
        try:
            work.replace(final)
        except OSError:
            if not final.is_dir():  # another request's fetch placed it first, or this one failed
                raise
        return final
    finally:
        remove_in_store(store, TOKENIZERS, work.name)


def remove_copy(name: str) -> None:
    """Remove this node's copy of a deleted variant, unless a variant of that name exists again (imported anew
    meanwhile: in a store shared with the node that imported it, the files there are the new variant's)."""
    if ModelVariant.objects.filter(name=name).exists():
        return
    store = Path(settings.MODEL_STORE)
    remove_in_store(store, str(store_path(name)))  # store_path checks the name
    for folder in in_store(store, TOKENIZERS).glob(f"{name}-*") if (store / TOKENIZERS).is_dir() else ():
        remove_in_store(store, TOKENIZERS, folder.name)
    log.info("removed this node's copy of deleted variant %s", name)
