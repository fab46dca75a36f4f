"""Worker-side lifecycle jobs: import a variant into the store, verify its files.

An import runs under a lease: the attempt claims the variant, renews the lease with
each progress report, and finishes only while it still holds it. A worker killed
mid-import stops renewing; appliance.actions.do_reclaim_stale_imports (beat, the worker's
start, the next import of that name) then removes its partial files and marks the variant failed.
"""
import errno
import logging
import os
import secrets
import socket
import time
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from . import actions, gguf_import
from .actions import LeaseLost
from .incoming import INCOMING, attempt_of, discard_attempt
from .modelfiles import (
    InvalidModelDir,
    OutsideStore,
    copy_and_hash,
    free_bytes,
    hash_dir,
    in_store,
    is_gguf_file,
    make_store_dir,
    manifest_mismatches,
    summarize,
    tree_size,
    validate_gguf_file,
    validate_model_dir,
)
from .models import ModelVariant, VariantStatus
from .names import InvalidName, check_name
from .provenance import check_expected_hash, from_hf_dir, merge
from .weightcheck import check_model_dir

log = logging.getLogger(__name__)
ACTOR = "system:worker"
PROGRESS_EVERY_S = 0.5
# Free space an import must leave: room for the database, ledger and logs that may share the disk.
SPACE_MARGIN_MIN = 16 * 1024 * 1024
SPACE_MARGIN_RATIO = 50  # and 2% of the model on top, for file-system overhead


class NotEnoughSpace(InvalidModelDir):
    """The store has too little free space for the model; the message says how much it needs and has."""


def store_path(name: str) -> Path:
    """Return the store directory of a variant name, checked to be a valid name lying inside the store."""
    return in_store(Path(settings.MODEL_STORE), check_name(name, field="variant name"))


def gb(size: int) -> str:
    return f"{size / 1e9:.2f}"


def space_needed(size: int) -> int:
    """Return the free bytes an import of size bytes needs: the files plus the margin."""
    return size + max(SPACE_MARGIN_MIN, size // SPACE_MARGIN_RATIO)


def check_space(size: int, store: Path) -> None:
    """Raise NotEnoughSpace unless the store can take size bytes and keep its margin."""
    needed, free = space_needed(size), free_bytes(store)
    if needed > free:
        raise NotEnoughSpace(
            f"not enough space in the model store: needs {gb(needed)} GB, {gb(free)} GB free "
            f"(the files take {gb(size)} GB; the rest is a margin for the database and logs)")


def lease_deadline():
    return timezone.now() + timedelta(seconds=settings.IMPORT_LEASE_S)


class Lease:
    """One import attempt's hold on its variant, renewed with its progress reports."""

    def __init__(self, variant_id: int, owner: str):
        self.variant_id, self.owner, self.last = variant_id, owner, 0.0

    def claim(self) -> bool:
        """Take a queued import (no attempt holds it yet); return whether this attempt got it."""
        return ModelVariant.objects.filter(
            pk=self.variant_id, status=VariantStatus.IMPORTING, lease_owner="",
        ).update(lease_owner=self.owner, lease_expires_at=lease_deadline(), progress=0) == 1

    def renew(self, **values) -> None:
        """Extend the lease (and set values such as progress), or raise LeaseLost when it was taken away."""
        self.last = time.monotonic()
        if not ModelVariant.objects.filter(
                pk=self.variant_id, status=VariantStatus.IMPORTING, lease_owner=self.owner,
        ).update(lease_expires_at=lease_deadline(), **values):
            raise LeaseLost(f"import attempt {self.owner} no longer holds variant {self.variant_id}")

    def progress(self, done: int, total: int) -> None:
        if time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self.renew(progress=min(99, done * 100 // total))

    def phase(self, words: str, low: int, high: int) -> "Phase":
        """Return a progress callback for one phase of the import, mapped onto low..high percent."""
        return Phase(self, words, low, high)


def mb(size: int) -> str:
    return f"{size / 1e6:,.1f}"


class Phase:
    """Progress of one phase (copy and hash, hash, convert): percent, and bytes done of total with the rate."""

    def __init__(self, lease: Lease, words: str, low: int, high: int):
        self.lease, self.words, self.low, self.high = lease, words, low, high
        self.started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if time.monotonic() - self.lease.last < PROGRESS_EVERY_S:
            return
        elapsed = max(time.monotonic() - self.started, 1e-3)
        percent = self.low + (self.high - self.low) * min(done, total) // max(total, 1)
        self.lease.renew(progress=min(99, percent), progress_detail=(
            f"{self.words}: {mb(done)} of {mb(total)} MB, {done / elapsed / 1e6:,.1f} MB/s")[:200])

    def waiting(self, step: str) -> None:
        """Report a phase whose size is not known while it runs (a conversion): its step and time so far."""
        if time.monotonic() - self.lease.last < PROGRESS_EVERY_S:
            return
        self.lease.renew(progress=self.low, progress_detail=(
            f"{self.words}: {step}, {time.monotonic() - self.started:.0f} s")[:200])


def run_import(variant_id: int) -> None:
    """Copy, hash and inspect a variant's source directory, then mark it ready (or failed)."""
    owner = f"{secrets.token_hex(8)}:{socket.gethostname()}:{os.getpid()}"[:100]
    lease = Lease(variant_id, owner)
    if not lease.claim():
        return  # deleted meanwhile, held by another attempt, or a redelivered task whose work is done
    variant = ModelVariant.objects.get(pk=variant_id)
    started = time.monotonic()
    full = False
    try:
        final, work, manifest, summary, provenance = _copy_in(variant, owner, lease)
        actions.do_finish_import(variant_id, owner=owner, work=work, final=final, manifest=manifest,
                                 summary=summary, provenance=provenance,
                                 duration_ms=int((time.monotonic() - started) * 1000), actor=ACTOR)
        discard_attempt(variant.name, owner)  # the copy moved into place; this drops .incoming/<name>
        return
    except LeaseLost:
        log.warning("import of %s by %s was taken away (lease expired or variant deleted)", variant.name, owner)
        discard_attempt(variant.name, owner)
        return
    except (InvalidModelDir, InvalidName, OutsideStore) as exc:
        reason, outcome = str(exc), "refused"
    except gguf_import.ConversionFailed as exc:
        reason, outcome = str(exc), "failed"
    except OSError as exc:
        full = exc.errno == errno.ENOSPC
        if not full:
            log.exception("import of %s failed", variant.name)
        reason, outcome = f"import failed: {exc}", "failed"
    except Exception as exc:
        log.exception("import of %s failed", variant.name)
        reason, outcome = f"import failed: {exc}", "failed"
    # Free the space first: on a full disk the failure could not be recorded otherwise.
    discard_attempt(variant.name, owner)
    if full:
        reason = _out_of_space(variant)
    actions.do_fail_import(variant_id, reason, outcome=outcome, owner=owner, actor=ACTOR)


def _out_of_space(variant: ModelVariant) -> str:
    """Return the reason an import that hit a full disk mid-copy failed, with what it needs and what is free now."""
    free = gb(free_bytes(Path(settings.MODEL_STORE)))
    try:
        needs = f"needs {gb(space_needed(source_size(Path(variant.source_path))))} GB"
    except (OSError, InvalidModelDir):
        needs = "needs more space"
    during = "while converting the GGUF" if is_gguf_file(Path(variant.source_path)) else "mid-copy"
    return (f"the model store ran out of space {during} (No space left on device); "
            f"partial files removed; {needs}, {free} GB free now")


def source_size(source: Path) -> int:
    """Return the bytes an import of source writes into the store (a GGUF is written dequantized)."""
    if is_gguf_file(source):
        return gguf_import.planned_size(gguf_import.read_facts(source))
    return tree_size(source)


def _copy_in(variant: ModelVariant, owner: str, lease: Lease):
    """Validate the source, check the space, copy (or convert) and hash it into its attempt directory.

    Returns what finish needs: the final and attempt paths, the manifest, the summary and the provenance.
    """
    final = store_path(variant.name)
    store = Path(settings.MODEL_STORE)
    # Resolved where it is read: a path given for another node's worker arrives as typed (a mount's alias).
    source = Path(variant.source_path).resolve()
    make_store_dir(store)
    make_store_dir(in_store(store, INCOMING))
    make_store_dir(in_store(store, INCOMING, variant.name))
    work = in_store(store, INCOMING, variant.name, attempt_of(owner))
    if source.is_file() or is_gguf_file(source):
        found = _convert_gguf(source, work, store, lease)
        lease.renew(progress=92, progress_detail="hashing the converted files")
        manifest = hash_dir(work)
    else:
        config = validate_model_dir(source)
        check_space(tree_size(source), store)
        lease.renew(progress_detail="copying")
        manifest = copy_and_hash(source, work, lease.phase("copying and hashing", 0, 98))
        found = from_hf_dir(work, config)
    # Headers, configs and the implied model are checked on the copy that will be served.
    check_model_dir(work)
    summary = summarize(work, validate_model_dir(work))
    provenance = merge(variant.provenance, found)
    check_expected_hash(provenance)
    lease.renew()
    return final, work, manifest, summary, provenance


def _convert_gguf(source: Path, work: Path, store: Path, lease: Lease) -> dict:
    """Hash a GGUF file, check it promises what its source said, convert it into work; return its provenance."""
    validate_gguf_file(source)
    facts = gguf_import.read_facts(source)
    check_space(gguf_import.planned_size(facts), store)
    sha256 = gguf_import.hash_file(source, lease.phase("hashing the GGUF file", 0, 20))
    found = gguf_import.from_gguf(facts, sha256)
    check_expected_hash({**ModelVariant.objects.get(pk=lease.variant_id).provenance, **found})
    converting = lease.phase(f"converting {facts['file_type'] or 'GGUF'} to safetensors", 25, 90)
    report = gguf_import.convert(source, work, renew=converting.waiting)
    found["converted_dtype"] = report["dtype"]
    return found


def check_store(variant: ModelVariant) -> list[str]:
    """Return how this node's copy of the variant's files differs from its manifest (empty when intact)."""
    try:
        local = store_path(variant.name)
        if not local.is_dir():
            return [f"store directory {local} is missing"]
        stored = hash_dir(local)
    except (InvalidModelDir, OutsideStore, InvalidName) as exc:  # a link or special file planted there: a mismatch
        return [str(exc)]
    return manifest_mismatches(variant.manifest, stored)


def run_verify(variant_id: int) -> None:
    """Re-hash this node's copy of a variant; quarantine that copy on mismatch, release it when intact."""
    variant = ModelVariant.objects.filter(pk=variant_id).first()
    if variant is None or variant.status in (VariantStatus.IMPORTING, VariantStatus.FAILED):
        return
    problems = check_store(variant)
    if problems:
        actions.do_quarantine(variant_id, problems, node=settings.APPLIANCE_NODE, actor=ACTOR)
    else:
        actions.do_record_verified(variant_id, node=settings.APPLIANCE_NODE, actor=ACTOR)
