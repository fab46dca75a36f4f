"""The evidence in the console: ledger, keys, checkpoints, attestations (read-only), transcripts."""
import base64
import json

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Max, Min
from django.utils.html import format_html

from audit import transcripts
from audit.attestation import signature_valid
from audit.models import AuditEvent, Checkpoint, NetworkAttestation, SigningKey, Transcript, TranscriptPolicy
from audit.tasks import export_bundle


class ReadOnlyAdmin(admin.ModelAdmin):
    """Evidence rows: shown, never added, changed or deleted from the console."""

    def has_add_permission(self, request):
        """Refuse: rows are written by the audit code only."""
        return False

    def has_change_permission(self, request, obj=None):
        """Refuse: evidence never changes."""
        return False

    def has_delete_permission(self, request, obj=None):
        """Refuse: evidence is never deleted here."""
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    """Show ledger events; nobody adds, changes or deletes them here."""

    list_display = ("seq", "created_at", "actor", "action", "target", "outcome")
    list_filter = ("action", "outcome")
    search_fields = ("actor", "action", "target")
    ordering = ("-seq",)
    date_hierarchy = "created_at"
    # Counting a large ledger on every page load is slow and tells nobody anything.
    show_full_result_count = False
    fields = (
        "seq", "created_at", "actor", "action", "target", "outcome",
        "details_pretty", "prev_hash", "hash", "body_text",
    )
    readonly_fields = fields

    @admin.display(description="details")
    def details_pretty(self, obj: AuditEvent) -> str:
        """Return the details as indented JSON."""
        text = json.dumps(obj.details, indent=2, sort_keys=True, ensure_ascii=False)
        return format_html("<pre>{}</pre>", text)

    @admin.display(description="body (hashed bytes)")
    def body_text(self, obj: AuditEvent) -> str:
        """Return the stored canonical body, the bytes the hash covers."""
        return format_html("<pre>{}</pre>", bytes(obj.body).decode("utf-8", errors="replace"))


@admin.action(description="Export the period of the selected events as a compliance bundle")
def export_period(modeladmin, request, queryset):
    """Queue an export covering the selected events' time span; the worker writes it to the export directory."""
    span = queryset.aggregate(since=Min("created_at"), until=Max("created_at"))
    if span["since"] is None:
        return
    export_bundle.delay_on_commit(span["since"].isoformat(), span["until"].isoformat(),
                                  f"admin:{request.user.get_username()}")
    modeladmin.message_user(request, f"Export of {span['since']:%Y-%m-%d %H:%M} to {span['until']:%Y-%m-%d %H:%M} "
                            "queued; the bundle appears in the export directory.")


AuditEventAdmin.actions = [export_period]


@admin.register(SigningKey)
class SigningKeyAdmin(ReadOnlyAdmin):
    """The checkpoint signing keys: the fingerprint an auditor passes to verify.py."""

    list_display = ("fingerprint_grouped", "origin", "created_at")
    fields = ("fingerprint", "fingerprint_grouped", "origin", "created_at", "public_key_b64")
    readonly_fields = fields

    @admin.display(description="fingerprint (grouped)")
    def fingerprint_grouped(self, obj: SigningKey) -> str:
        """Return the fingerprint in groups of eight, easier to read aloud."""
        return " ".join(obj.fingerprint[i:i + 8] for i in range(0, 64, 8))

    @admin.display(description="public key (Ed25519, base64)")
    def public_key_b64(self, obj: SigningKey) -> str:
        """Return the raw public key in base64."""
        return base64.b64encode(bytes(obj.public_key)).decode()


@admin.register(Checkpoint)
class CheckpointAdmin(ReadOnlyAdmin):
    """Signed checkpoints, newest first."""

    list_display = ("id", "created_at", "kind", "tree_size", "key_fingerprint")
    list_filter = ("kind",)
    ordering = ("-id",)
    show_full_result_count = False
    fields = ("created_at", "kind", "tree_size", "root_hash", "key_fingerprint", "note_text")
    readonly_fields = fields

    @admin.display(description="signed note")
    def note_text(self, obj: Checkpoint) -> str:
        """Return the C2SP note as preformatted text."""
        return format_html("<pre>{}</pre>", obj.note)


@admin.register(NetworkAttestation)
class NetworkAttestationAdmin(ReadOnlyAdmin):
    """The latest network attestation first, and the history below it."""

    list_display = ("seq", "created_at", "actor", "outcome", "processes", "outside", "listening", "signed")
    list_filter = ("outcome",)
    fields = ("seq", "created_at", "outcome", "signed", "details_pretty")
    readonly_fields = fields
    show_full_result_count = False
    details_pretty = AuditEventAdmin.details_pretty

    @admin.display(description="connections outside the allowlist")
    def outside(self, obj) -> int:
        """Return how many established connections went outside the allowlist."""
        return obj.details.get("snapshot", {}).get("established_outside_allowlist")

    @admin.display(description="processes attested")
    def processes(self, obj) -> str:
        """Return the roles and pids of the appliance processes the snapshot covered."""
        covered = obj.details.get("snapshot", {}).get("processes", [])
        return ", ".join(f"{p['name']} ({p['pid']})" for p in covered) or "—"

    @admin.display(description="listening ports")
    def listening(self, obj) -> int:
        """Return how many listening sockets the snapshot saw."""
        return len(obj.details.get("snapshot", {}).get("listening", []))

    @admin.display(description="signature valid", boolean=True)
    def signed(self, obj) -> bool:
        """Return whether the snapshot's signature verifies."""
        return signature_valid(obj.details)


@admin.register(TranscriptPolicy)
class TranscriptPolicyAdmin(admin.ModelAdmin):
    """Per-team transcript settings; every change is a ledger event."""

    list_display = ("team", "keep_transcripts", "retention_days")

    def save_model(self, request, obj, form, change):
        """Save through set_policy, which records the change in the ledger."""
        transcripts.set_policy(obj.team, keep=obj.keep_transcripts, retention_days=obj.retention_days,
                               actor=f"admin:{request.user.get_username()}")


@admin.register(Transcript)
class TranscriptAdmin(ReadOnlyAdmin):
    """Encrypted transcripts: metadata for staff, the text only with audit.read_transcript (and on record)."""

    list_display = ("id", "team", "model", "created_at")
    list_filter = ("team",)
    fields = ("team", "model", "created_at", "text")
    readonly_fields = fields

    def change_view(self, request, object_id, form_url="", extra_context=None):
        """Remember who is looking, so the text field can check their permission and record the read."""
        self._request = request
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.display(description="exchange (decrypted; this read is recorded)")
    def text(self, obj: Transcript) -> str:
        """Return the decrypted exchange, or why it cannot be shown."""
        try:
            exchange = transcripts.read(obj, self._request.user)
        except PermissionDenied:
            return "You need the permission “Can read decrypted chat transcripts”."
        except transcripts.Shredded:
            return "This team's key was shredded: the transcript can no longer be read."
        return format_html("<pre>{}</pre>", json.dumps(exchange, indent=2, ensure_ascii=False))
