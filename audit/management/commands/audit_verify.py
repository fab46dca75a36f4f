"""Verify the audit ledger's hash chain from the command line."""
from django.core.management.base import BaseCommand, CommandError

from audit.ledger import verify


class Command(BaseCommand):
    help = "Walk the audit ledger's hash chain; exit 1 naming the first broken event."
    # An auditor's tool must work even when another part of the project fails
    # its system checks (a broken URLconf, say): it needs only the ledger table.
    requires_system_checks = []

    def handle(self, *args, **options):
        """Print a summary, or raise CommandError (exit status 1) at the first broken event."""
        result = verify()
        if not result.ok:
            raise CommandError(
                f"audit ledger BROKEN at event {result.first_bad_seq}: {result.reason}",
                returncode=1,
            )
        self.stdout.write(
            f"audit ledger intact: {result.events_checked} events, head hash {result.head_hash}"
        )
