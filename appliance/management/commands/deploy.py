from django.core.management.base import BaseCommand, CommandError

from appliance.actions import do_deploy
from appliance.models import ActualState, Deployment

from ._common import cli_actor, get_variant, refusals_as_errors, wait_for


class Command(BaseCommand):
    help = "Ask the web process to load a variant."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--engine", help="builtin, vllm, sglang or auto (default: the deployment's engine, "
                                                 "builtin for a first deploy)")
        parser.add_argument("--wait", action="store_true", help="wait until the web process has loaded it")
        parser.add_argument("--timeout", type=float, default=300)

    def handle(self, name, engine, wait, timeout, **options):
        with refusals_as_errors():
            deployment = do_deploy(get_variant(name), actor=cli_actor(), engine=engine)
        self.stdout.write(f"{name}: deploy requested on engine {deployment.engine}")
        if not wait:
            return

        def settled():
            d = Deployment.objects.get(pk=deployment.pk)
            return d if d.actual in (ActualState.DEPLOYED, ActualState.FAILED) else None

        deployment = wait_for(settled, timeout=timeout, what=f"the web process to load {name} (is it running?)")
        if deployment.actual == ActualState.FAILED:
            raise CommandError(f"{name} failed to load: {deployment.detail}")
        self.stdout.write(f"{name} deployed on {deployment.device} ({deployment.engine})")
