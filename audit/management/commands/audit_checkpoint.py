"""Sign a checkpoint of the audit ledger now, or rotate the signing key."""
from django.core.management.base import BaseCommand, CommandError

from audit.checkpoints import InconsistentLedger, make_checkpoint, rotate_key


class Command(BaseCommand):
    help = "Sign a checkpoint of the ledger as it stands (beat also does this every few minutes)."
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("--rotate-key", action="store_true",
                            help="replace the signing key; the old key signs the change into the ledger")

    def handle(self, *args, **options):
        """Print the signed note of the new checkpoint, or exit 1 when signing is refused."""
        try:
            checkpoint = rotate_key("admin:cli") if options["rotate_key"] else make_checkpoint("manual")
        except InconsistentLedger as exc:
            raise CommandError(f"checkpoint refused: {exc}", returncode=1) from None
        self.stdout.write(f"checkpoint of {checkpoint.tree_size} events, key {checkpoint.key_fingerprint}\n")
        self.stdout.write(checkpoint.note, ending="")
