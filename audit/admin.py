"""The ledger in the console: read-only, newest first."""
import json

from django.contrib import admin
from django.utils.html import format_html

from audit.models import AuditEvent


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
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

    def has_add_permission(self, request):
        """Refuse: events are added by audit.ledger.append only."""
        return False

    def has_change_permission(self, request, obj=None):
        """Refuse: events never change."""
        return False

    def has_delete_permission(self, request, obj=None):
        """Refuse: events are never deleted."""
        return False

    @admin.display(description="details")
    def details_pretty(self, obj: AuditEvent) -> str:
        """Return the details as indented JSON."""
        text = json.dumps(obj.details, indent=2, sort_keys=True, ensure_ascii=False)
        return format_html("<pre>{}</pre>", text)

    @admin.display(description="body (hashed bytes)")
    def body_text(self, obj: AuditEvent) -> str:
        """Return the stored canonical body, the bytes the hash covers."""
        return format_html("<pre>{}</pre>", bytes(obj.body).decode("utf-8", errors="replace"))
