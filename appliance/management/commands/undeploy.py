from django.core.management.base import BaseCommand

from appliance.actions import do_undeploy

from ._common import cli_actor, get_variant


class Command(BaseCommand):
    help = "Ask the web process to unload a variant."

    def add_arguments(self, parser):
        parser.add_argument("name")

    def handle(self, name, **options):
        do_undeploy(get_variant(name), actor=cli_actor())
        self.stdout.write(f"{name}: undeploy requested")
