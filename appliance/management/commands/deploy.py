from django.core.management.base import BaseCommand, CommandError

from appliance.actions import do_deploy
from appliance.models import ActualState, Deployment, Node

from ._common import cli_actor, get_variant, refusals_as_errors, wait_for


class Command(BaseCommand):
    help = "Ask a node's web process to load a variant."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--engine", help="builtin, vllm, sglang or auto (default: the deployment's engine, "
                                                 "builtin for a first deploy)")
        parser.add_argument("--node", help="the node to run it on, or 'anywhere': the up node with the most memory "
                                           "left (default: the deployment's node, this node for a first deploy)")
        parser.add_argument("--replica", action="append", metavar="NODE",
                            help="another node that serves it too, with an engine of its own (repeat for more; "
                                 "default: the deployment's replicas, none for a first deploy)")
        parser.add_argument("--no-replicas", action="store_true", help="drop the deployment's replicas")
        parser.add_argument("--plan", help="with --engine vllm: the fit plan (tp2, dp8-ep8, ...) as vLLM's arguments")
        parser.add_argument("--hardware", help="with --plan: the deployment's hardware over every box (e.g. 2x8xH200; "
                                               "default: this box)")
        parser.add_argument("--context", type=int, help="with --plan: vLLM's max model length (default: the model's)")
        parser.add_argument("--wait", action="store_true", help="wait until the web process has loaded it")
        parser.add_argument("--timeout", type=float, default=300)

    def handle(self, name, engine, node, replica, no_replicas, plan, hardware, context, wait, timeout, **options):
        variant = get_variant(name)
        flags = planned_flags(engine, plan, hardware, context) if plan or hardware or context else None
        with refusals_as_errors():
            deployment = do_deploy(variant, actor=cli_actor(), engine=engine, engine_flags=flags, node=node,
                                   replicas=[] if no_replicas else replica)
        replicas = f", replicas {', '.join(deployment.replicas)}" if deployment.replicas else ""
        self.stdout.write(f"{name}: deploy requested on engine {deployment.engine}, node {deployment.node}{replicas}")
        if not wait:
            return

        def settled():
            d = Deployment.objects.get(pk=deployment.pk)
            return d if d.actual in (ActualState.DEPLOYED, ActualState.FAILED) else None

        deployment = wait_for(settled, timeout=timeout,
                              what=f"node {deployment.node}'s web process to load {name} (is it running?)")
        if deployment.actual == ActualState.FAILED:
            raise CommandError(f"{name} failed to load: {deployment.detail}")
        self.stdout.write(f"{name} deployed on {deployment.node}'s {deployment.device} ({deployment.engine})")
        for other in deployment.replicas:  # a replica's state is its heartbeat: what its engines serve
            wait_for(lambda: name in (Node.objects.filter(name=other).values_list("serving", flat=True).first() or ()),
                     timeout=timeout, what=f"replica {other}'s web process to load {name} (see its deployment.load "
                                           "events)")
            self.stdout.write(f"{name} served by replica {other} too")


def planned_flags(engine: str | None, plan: str | None, hardware: str | None, context: int | None) -> list[str]:
    """Return vLLM's arguments for the plan on this box; refuse what this box cannot start, naming what is missing."""
    # Here: planning loads the engines' module, and with it torch, which a plain deploy never needs.
    from appliance.engine_plan import vllm_plan
    from inference.fit.engine_flags import missing_for
    from inference.fit.hardware import inventory

    if engine != "vllm":
        raise CommandError("--plan, --hardware and --context set vLLM's arguments: deploy with --engine vllm")
    try:
        planned = vllm_plan(hardware, plan, context)
    except ValueError as exc:
        raise CommandError(f"deploy refused: {exc}") from exc
    missing = missing_for(planned.plan, planned.hardware, inventory(measure=False).gpus)
    if missing:
        raise CommandError(f"deploy refused: {missing}")
    if len(planned.launches) > 1:
        raise CommandError(f"deploy refused: plan {planned.plan.label} runs on {len(planned.launches)} boxes, and "
                           "this appliance does not yet start the other nodes' parts from their workers; start each "
                           "node's command from `manage.py fit MODEL --vllm-flags` (same --plan and --hardware)")
    return list(planned.launches[0].args)
