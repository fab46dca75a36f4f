from django.core.management.base import BaseCommand, CommandError

from appliance.actions import do_deploy
from appliance.models import ActualState, Deployment, Node

# vLLM's default port for the parts to reach the head (inference.fit.engine_flags.RPC_PORT: that package loads torch,
# which a plain deploy never needs).
RPC_PORT = 13345

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
        parser.add_argument("--part", action="append", metavar="NODE",
                            help="with --engine vllm: another node that runs a part of its one engine (vLLM's "
                                 "headless data-parallel ranks; repeat for more, in rank order); --node is the head, "
                                 "which serves the API. Without --plan, one rank per node")
        parser.add_argument("--no-parts", action="store_true", help="drop the deployment's parts")
        parser.add_argument("--rpc-port", type=int, default=RPC_PORT,
                            help=f"with --part: the head's port the parts reach it on (default {RPC_PORT})")
        parser.add_argument("--plan", help="with --engine vllm or sglang: the fit plan (tp2, dp8-ep8, ...) as that "
                                           "engine's arguments")
        parser.add_argument("--hardware", help="with --plan: the deployment's hardware over every box (e.g. 2x8xH200; "
                                               "default: this box)")
        parser.add_argument("--context", type=int, help="with --plan: the engine's max model length (default: the "
                                                         "model's)")
        parser.add_argument("--wait", action="store_true", help="wait until the web process has loaded it")
        parser.add_argument("--timeout", type=float, default=300)

    def handle(self, name, engine, node, replica, no_replicas, part, no_parts, rpc_port, plan, hardware, context,
               wait, timeout, **options):
        variant = get_variant(name)
        parts = [] if no_parts else part
        flags = None
        if plan or hardware or context:
            flags = planned_flags(engine, plan, hardware, context, parts or [], rpc_port)
        elif parts:
            flags = one_rank_per_node(engine, parts, rpc_port)
        with refusals_as_errors():
            deployment = do_deploy(variant, actor=cli_actor(), engine=engine, engine_flags=flags, node=node,
                                   replicas=[] if no_replicas else replica, parts=parts)
        others = f", replicas {', '.join(deployment.replicas)}" if deployment.replicas else ""
        if deployment.parts:
            others = f" (the head), parts on {', '.join(deployment.parts)}"
        self.stdout.write(f"{name}: deploy requested on engine {deployment.engine}, node {deployment.node}{others}")
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


def one_rank_per_node(engine: str | None, parts: list[str], rpc_port: int) -> list[str]:
    """Return vLLM's arguments for a deployment over the head and `parts` without a plan: one data-parallel rank per
    node (on CPU boxes, vLLM's CPU build runs one engine per box)."""
    from inference.fit.engine_flags import over_boxes

    if engine != "vllm":
        raise CommandError("--part runs parts of one vLLM engine on other nodes: deploy with --engine vllm")
    return over_boxes(["--data-parallel-size", str(1 + len(parts))], 1, rpc_port=rpc_port)


def planned_flags(engine: str | None, plan: str | None, hardware: str | None, context: int | None,
                  parts: list[str], rpc_port: int) -> list[str]:
    """Return the engine's arguments for the plan on this box, or over it and `parts` (the arguments every node
    shares); refuse what this box cannot start, naming what is missing."""
    # Here: planning loads the engines' module, and with it torch, which a plain deploy never needs.
    from appliance.engine_plan import launch_plan
    from inference.fit.engine_flags import ENGINE_NAMES, missing_for
    from inference.fit.hardware import inventory

    if engine not in ENGINE_NAMES:
        raise CommandError("--plan, --hardware and --context set an external engine's arguments: deploy with "
                           "--engine vllm or --engine sglang")
    try:
        planned = launch_plan(engine, hardware, plan, context, rpc_port=rpc_port)
    except ValueError as exc:
        raise CommandError(f"deploy refused: {exc}") from exc
    missing = missing_for(planned.plan, planned.hardware, inventory(measure=False).gpus, engine)
    if missing:
        raise CommandError(f"deploy refused: {missing}")
    boxes = len(planned.launches)
    if boxes != 1 + len(parts):
        raise CommandError(f"deploy refused: plan {planned.plan.label} on {planned.hardware.label} runs on {boxes} "
                           f"box(es), and the deployment names {1 + len(parts)} node(s) (--node and each --part); "
                           f"name {boxes - 1} other node(s) with --part")
    if boxes > 1 and engine != "vllm":
        raise CommandError(f"deploy refused: this appliance starts the parts of a deployment over several boxes for "
                           f"vLLM only; start each node's {ENGINE_NAMES[engine]} command from `manage.py fit MODEL "
                           f"--engine-flags --engine {engine}` (same --plan and --hardware)")
    return list(planned.launches[0].args)
