import os

from django.core.management.base import BaseCommand

from appliance import launcher


class Command(BaseCommand):
    help = "Set up the box on embedded defaults (demo models, admin, demo key) and run web, worker and beat."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=int(os.environ.get("APPLIANCE_PORT", "8000")))

    def handle(self, port, **options):
        launcher.run(port)
