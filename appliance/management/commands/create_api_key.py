from django.core.management.base import BaseCommand

from appliance.actions import do_create_team, do_issue_api_key

from ._common import cli_actor, refusals_as_errors


class Command(BaseCommand):
    help = "Issue an API key for a team (created if needed); the key is printed once, alone on the last line."

    def add_arguments(self, parser):
        parser.add_argument("--team", required=True)
        parser.add_argument("--name", default="")

    def handle(self, team, name, **options):
        actor = cli_actor()
        with refusals_as_errors():
            key, plaintext = do_issue_api_key(do_create_team(team, actor=actor), actor=actor, name=name)
        self.stderr.write(f"key {key.prefix}… for team {team}; it is shown once and stored only as a hash")
        self.stdout.write(plaintext)
