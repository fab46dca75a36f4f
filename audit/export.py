"""Write a compliance export: events, signed checkpoints, proofs, keys, report and verify.py in one zip."""
import base64
import json
import zipfile
from datetime import datetime, timezone
from pathlib import Path

from django.conf import settings

from audit import keys, ledger
from audit.canonical import canonical_bytes
from audit.checkpoints import make_checkpoint
from audit.merkle import MerkleTree, leaf_hash
from audit.models import GENESIS_HASH, AuditEvent, Checkpoint, SigningKey
from audit.report import build_report
from audit.verifier import Key, Problem, open_checkpoint, verify_bundle

VERIFIER = Path(__file__).with_name("verifier.py")
AUDITOR_README = Path(__file__).with_name("auditor_readme.txt")


def export(out: Path, since: datetime, until: datetime | None = None, *, actor: str,
           since_checkpoint: str | None = None) -> dict:
    """Write the bundle for events from since to until into out and return its manifest."""
    final = make_checkpoint("export")  # covers everything up to now, so the tail is signed
    until = min(until or final.created_at, final.created_at)
    if since.tzinfo is None or until.tzinfo is None:
        raise ValueError("since and until must be timezone-aware")
    size = final.tree_size
    events = AuditEvent.objects.filter(seq__lte=size)
    period = events.filter(created_at__gte=since, created_at__lte=until)
    first_seq = period.order_by("seq").values_list("seq", flat=True).first() or _after(events, until) + 1
    last_seq = period.order_by("-seq").values_list("seq", flat=True).first() or first_seq - 1
    leaves, bodies = [], []
    for seq, body in events.order_by("seq").values_list("seq", "body").iterator(chunk_size=5000):
        body = bytes(body)
        leaves.append(leaf_hash(body))
        if first_seq <= seq <= last_seq:
            bodies.append(body)
    tree = MerkleTree(leaves)
    notes = _checkpoint_notes(since, until, final)
    signed = [open_checkpoint(n, _all_keys()) for n in notes]
    sizes = {first_seq - 1, last_seq} | {cp.size for cp in signed}
    if since_checkpoint:
        sizes.add(open_checkpoint(since_checkpoint, _all_keys()).size)
    sizes = sorted(s for s in sizes if s <= size)
    proofs = [{"from": a, "to": b, "hashes": [h.hex() for h in tree.consistency_proof(a, b)]}
              for a, b in zip(sizes, sizes[1:])]
    prev_hash = (AuditEvent.objects.filter(seq=first_seq - 1).values_list("hash", flat=True).first()
                 if first_seq > 1 else GENESIS_HASH)
    key = keys.active_key()
    manifest = {
        "format": "llm-appliance-audit-export/1", "origin": key.origin, "key_fingerprint": key.fingerprint,
        "export_time": int(final.created_at.timestamp()), "since": int(since.timestamp()),
        "until": int(until.timestamp()), "since_iso": since.isoformat(), "until_iso": until.isoformat(),
        "first_seq": first_seq, "last_seq": last_seq, "prev_hash": prev_hash, "tree_size": size,
        "heartbeat_s": settings.AUDIT_HEARTBEAT_S, "max_gap_s": settings.AUDIT_MAX_GAP_S,
    }
    manifest_bytes = canonical_bytes(manifest)
    fingerprint, signature = keys.sign(manifest_bytes, key)
    frontier = tree.frontier(first_seq - 1)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("manifest.json", manifest_bytes)
        bundle.writestr("manifest.sig", json.dumps({"fingerprint": fingerprint,
                                                    "signature": _b64(signature)}))
        bundle.writestr("keys.json", json.dumps(keys.keys_document(), indent=1))
        bundle.writestr("checkpoints.json", json.dumps(notes, indent=1))
        bundle.writestr("checkpoint.txt", notes[-1])  # --since-checkpoint for the next export
        bundle.writestr("proofs.json", json.dumps(proofs))
        bundle.writestr("frontier.json", json.dumps({"size": frontier.size,
                                                     "hashes": [h.hex() for h in frontier.hashes]}))
        bundle.writestr("events.jsonl", b"".join(b + b"\n" for b in bodies))
        bundle.writestr("verify.py", VERIFIER.read_bytes())
        bundle.writestr("README.txt", AUDITOR_README.read_text().format(fingerprint=key.fingerprint))
    status = _self_check(out, key.fingerprint, since_checkpoint)
    _add_report(out, manifest, bodies, signed, status)
    ledger.append("audit.export", actor=actor, target=out.name, details={
        "first_seq": first_seq, "last_seq": last_seq, "since": manifest["since_iso"],
        "until": manifest["until_iso"], "checkpoint_size": size, "verified": status})
    return manifest


def _after(events, until: datetime) -> int:
    """Return the seq of the last event at or before until (0 when none), for an empty period."""
    return events.filter(created_at__lte=until).order_by("-seq").values_list("seq", flat=True).first() or 0


def _all_keys() -> list[Key]:
    """Return every signing key the box has had."""
    return [Key(k.origin, bytes(k.public_key)) for k in SigningKey.objects.order_by("id")]


def _checkpoint_notes(since: datetime, until: datetime, final: Checkpoint) -> list[str]:
    """Return the notes of the checkpoints made in the period, then the first one after it."""
    rows = Checkpoint.objects.filter(id__lte=final.id).order_by("id")
    inside = list(rows.filter(created_at__gte=since, created_at__lte=until).values_list("note", flat=True))
    after = rows.filter(created_at__gt=until).values_list("note", flat=True).first()
    notes = inside + ([after] if after else [])
    return notes or [final.note]


def _b64(data: bytes) -> str:
    """Return data in standard base64."""
    return base64.b64encode(data).decode()


def _self_check(out: Path, fingerprint: str, since_checkpoint: str | None) -> str:
    """Run the bundle's own verifier over it, so the report states what an auditor will see."""
    try:
        return verify_bundle(str(out), fingerprint, since_checkpoint)
    except Problem as problem:
        return f"FAILED: {problem}"


def _add_report(out: Path, manifest: dict, bodies: list[bytes], signed: list, status: str) -> None:
    """Append the auditor's report (HTML and PDF) to the bundle."""
    from audit.report_render import render_html, render_pdf  # here: reportlab loads only to export

    report = build_report(manifest, [json.loads(b) for b in bodies], signed, status,
                          generated=datetime.now(timezone.utc))
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("report.html", render_html(report))
        bundle.writestr("report.pdf", render_pdf(report))
