"""Verify the live audit ledger: its hash chain, its signed checkpoints and their Merkle roots."""
from django.core.management.base import BaseCommand, CommandError

from audit.live_verify import verify_live


class Command(BaseCommand):
    help = ("Check the ledger's hash chain, every signed checkpoint (signature, order, forks, heartbeat "
            "gaps, age of the latest) and the Merkle roots; exit 1 naming the first affected event.")
    # An auditor's tool must work even when another part of the project fails
    # its system checks (a broken URLconf, say): it needs only the ledger tables.
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("--pubkey-fingerprint", help="trust only this key (and the keys it rotated "
                            "to or from); by default, the keys pinned in APPLIANCE_HOME")
        parser.add_argument("--max-gap", type=int, help="seconds allowed between checkpoints and since "
                            "the latest (default: settings.AUDIT_MAX_GAP_S)")

    def handle(self, *args, **options):
        """Print a summary, or raise CommandError (exit status 1) at the first problem."""
        result = verify_live(options["pubkey_fingerprint"], max_gap=options["max_gap"])
        if not result.ok:
            where = f" at event {result.first_bad_seq}" if result.first_bad_seq else ""
            raise CommandError(f"audit ledger BROKEN{where}: {result.reason}", returncode=1)
        self.stdout.write(f"audit ledger intact: {result.reason}")
