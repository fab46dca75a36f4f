from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from inference.demo_models import DEMO_SPECS, is_complete, make_demo_models


class Command(BaseCommand):
    help = "Write the three tiny random-weight demo models (MoE, distilled, dense) into DIR/<name>/."

    def add_arguments(self, parser):
        parser.add_argument("dir", type=Path)
        parser.add_argument("--only", nargs="+", choices=sorted(DEMO_SPECS), metavar="NAME",
                            help=f"write only these ({', '.join(DEMO_SPECS)})")
        parser.add_argument("--force", action="store_true", help="rewrite models that already exist")

    def handle(self, dir, only, force, **options):
        names = only or list(DEMO_SPECS)
        # Skipping complete models keeps `make run` fast; the files are deterministic, so rewriting changes nothing.
        todo = [n for n in names if force or not is_complete(dir / n)]
        try:
            written = set(make_demo_models(dir, names=todo)) if todo else set()
        except OSError as exc:
            raise CommandError(f"cannot write demo models into {dir}: {exc}") from exc
        for name in names:
            path = (dir / name).resolve()
            size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
            state = "written" if dir / name in written else "exists, skipped"
            self.stdout.write(f"{name}: {path} ({size / 1e6:.1f} MB, {state})")
