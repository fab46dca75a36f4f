"""Where a deployment runs: a node the administrator names, or "anywhere", which picks the up node with the most
memory left.

A node's memory is its GPUs' memory where it has GPUs, else its host memory, as its heartbeat reports them
(appliance.nodes.inventory); what is left is that less the weights of the variants already placed on it (their size
in the store: what the engine holds before its KV cache). Counting placements rather than asking the node for its
free memory now makes the choice the same whoever asks and whenever: a node still loading a model has already
given that memory away.
"""
from django.conf import settings
from django.utils import timezone

from .models import DesiredState, Deployment, ModelVariant, Node, NodeState

ANYWHERE = "anywhere"


class PlacementRefused(Exception):
    """No node can take the deployment, or the one named cannot; the message says why."""


def capacity_bytes(node: Node) -> int:
    """Return the memory a node's engines load weights into: its GPUs' memory, or its host memory without GPUs."""
    gpu_bytes = sum(int(gpu.get("memory_bytes", 0)) for gpu in node.gpus)
    return gpu_bytes or node.memory_bytes


def serves_here(deployment: Deployment, node_name: str) -> bool:
    """Return whether the deployment runs on the node: its own node, or one of its replicas."""
    return deployment.node == node_name or node_name in deployment.replicas


def served_by_this_node(deployment: Deployment) -> bool:
    """Return whether this node serves the deployment: its node, one of its replicas, or (a deployment without a
    node, made before placement existed) wherever it is reconciled, as then."""
    return deployment.node == "" or serves_here(deployment, settings.APPLIANCE_NODE)


def placed_bytes(node_name: str, *, leaving_out: ModelVariant | None = None) -> int:
    """Return the store size of the variants deployed (or being deployed) on the node, as its node or a replica."""
    deployments = Deployment.objects.filter(desired=DesiredState.DEPLOYED).select_related("variant")
    return sum(d.variant.size_bytes for d in deployments
               if serves_here(d, node_name) and (leaving_out is None or d.variant_id != leaving_out.pk))


def memory_left(node: Node, variant: ModelVariant) -> int:
    """Return the node's memory left once the variant's weights are on it (negative: they do not fit)."""
    return capacity_bytes(node) - placed_bytes(node.name, leaving_out=variant) - variant.size_bytes


def choose_node(variant: ModelVariant, asked: str) -> str:
    """Return the node the variant is to run on: `asked` itself (another node must be registered and not down), or
    for ANYWHERE the up node where it fits with the most memory left (ties by name). Raise PlacementRefused naming
    the reason."""
    now = timezone.now()
    if asked == settings.APPLIANCE_NODE:
        return asked  # this node: its web process registers when it starts, and loads what is placed on it then
    if asked != ANYWHERE:
        node = Node.objects.filter(name=asked).first()
        if node is None:
            known = ", ".join(Node.objects.values_list("name", flat=True)) or "none"
            raise PlacementRefused(f"node {asked} is not a node of this appliance (nodes: {known})")
        if node.state(now) == NodeState.DOWN:
            raise PlacementRefused(f"node {asked} is down (last heartbeat {node.last_heartbeat:%Y-%m-%d %H:%M:%S})")
        return asked
    candidates = [(memory_left(node, variant), node.name) for node in Node.objects.all()
                  if node.state(now) == NodeState.UP]
    fitting = [(left, name) for left, name in candidates if left >= 0]
    if not fitting:
        if not candidates:
            raise PlacementRefused("no node of this appliance is up")
        raise PlacementRefused(f"{variant.name} ({variant.size_bytes / 1e9:.1f} GB) fits on no up node: "
                               + ", ".join(f"{name} has {(left + variant.size_bytes) / 1e9:.1f} GB left"
                                           for left, name in sorted(candidates, key=lambda c: c[1])))
    return min(fitting, key=lambda c: (-c[0], c[1]))[1]


def choose_replicas(variant: ModelVariant, asked: list[str], node: str, role: str = "replica") -> list[str]:
    """Return the nodes of the replicas (or of another `role`: the parts), each checked as a named node is
    (registered, not down), in the order asked, without repeats and without the deployment's own node; raise
    PlacementRefused naming the first bad one."""
    chosen: list[str] = []
    for name in asked:
        if name == ANYWHERE:
            raise PlacementRefused(f"a {role} is placed on a named node, not 'anywhere'")
        if name != node and name not in chosen:
            chosen.append(choose_node(variant, name))
    return chosen


def placed_elsewhere(model: str) -> Node | None:
    """Return a node a deployed variant is placed on (its own node, else a replica's) when none is this one
    (else None)."""
    deployment = Deployment.objects.filter(variant__name=model, desired=DesiredState.DEPLOYED).first()
    if deployment is None or served_by_this_node(deployment):
        return None
    return Node.objects.filter(name=deployment.node).first()
