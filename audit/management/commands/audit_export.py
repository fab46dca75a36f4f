"""Write a compliance export of the audit ledger for a period."""
from datetime import date, datetime, time, timezone
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from audit.checkpoints import InconsistentLedger
from audit.export import export


def parse_moment(text: str, end_of_day: bool) -> datetime:
    """Return a date (start or end of that UTC day) or an ISO datetime (UTC when naive)."""
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time.max if end_of_day else time.min, timezone.utc)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(f"{text!r} is not a date (YYYY-MM-DD) or an ISO date-time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class Command(BaseCommand):
    help = ("Export events, signed checkpoints, consistency proofs, the public key, a report and a "
            "standalone verify.py for the period into one zip.")
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("out", help="the zip file to write")
        parser.add_argument("--since", required=True, help="first day (YYYY-MM-DD, UTC) or ISO date-time")
        parser.add_argument("--until", help="last day (inclusive) or ISO date-time; default: now")
        parser.add_argument("--since-checkpoint", metavar="FILE",
                            help="the previous export's checkpoint.txt, to include a proof from it")
        parser.add_argument("--actor", default="admin:cli", help="who asked, for the ledger")

    def handle(self, *args, **options):
        """Write the bundle and print where it is and what verify.py said about it."""
        out = Path(options["out"])
        since = parse_moment(options["since"], end_of_day=False)
        until = parse_moment(options["until"], end_of_day=True) if options["until"] else None
        previous = Path(options["since_checkpoint"]).read_text() if options["since_checkpoint"] else None
        try:
            manifest = export(out, since, until, actor=options["actor"], since_checkpoint=previous)
        except InconsistentLedger as exc:
            raise CommandError(f"export refused: {exc}", returncode=1) from None
        self.stdout.write(f"wrote {out}: events {manifest['first_seq']}..{manifest['last_seq']}, "
                          f"key {manifest['key_fingerprint']}")
