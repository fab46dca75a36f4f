"""Placement: a deployment runs on the node it names (this node by default) or anywhere (the up node with the most
memory left), each node's reconciler serves only what is placed on it, and a node never moves a running deployment."""
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from appliance import actions, engine_client, placement, reconciler
from appliance.models import ActualState, Deployment, Node
from audit.models import AuditEvent
from tests.appliance.teams import variant

pytestmark = pytest.mark.django_db
GB = 10**9


def node(name: str, *, gpu_gb: int = 0, host_gb: int = 64, silent_s: float = 0) -> Node:
    """Register a node with the given memory that last spoke silent_s ago."""
    row = actions.do_register_node(name, address=f"http://127.0.0.2:{8000 + len(name)}", version="0.1.0",
                                   actor="system:web", gpus=[{"name": "GPU", "memory_bytes": gpu_gb * GB}] if gpu_gb
                                   else [], memory_bytes=host_gb * GB)
    Node.objects.filter(pk=row.pk).update(last_heartbeat=timezone.now() - timedelta(seconds=silent_s))
    return row


def sized(name: str, size_gb: float):
    row = variant(name)
    row.size_bytes = int(size_gb * GB)
    row.save(update_fields=["size_bytes"])
    return row


def test_a_first_deploy_runs_on_this_node_even_before_it_registered(settings):
    settings.APPLIANCE_NODE = "box-a"
    deployment = actions.do_deploy(sized("m", 1), actor="test")
    assert deployment.node == "box-a"
    event = AuditEvent.objects.filter(action="deployment.deploy").latest("seq")
    assert event.details["placed_on"] == "box-a"


def test_a_named_node_must_be_registered_and_not_down(settings):
    settings.APPLIANCE_NODE = "box-a"
    node("box-b", silent_s=3600)
    with pytest.raises(actions.ActionRefused, match="node box-c is not a node of this appliance .nodes: box-b"):
        actions.do_deploy(sized("m", 1), actor="test", node="box-c")
    with pytest.raises(actions.ActionRefused, match="node box-b is down"):
        actions.do_deploy(sized("n", 1), actor="test", node="box-b")
    assert not Deployment.objects.filter(node__in=["box-b", "box-c"]).exists()


def test_anywhere_picks_the_up_node_with_the_most_memory_left(settings):
    settings.APPLIANCE_NODE = "box-a"
    node("box-a", host_gb=64)
    node("box-b", gpu_gb=80, host_gb=512)  # GPUs: their memory is what counts, not the host's
    node("box-c", host_gb=1000, silent_s=3600)  # down: never chosen
    assert actions.do_deploy(sized("first", 30), actor="test", node=placement.ANYWHERE).node == "box-b"
    # box-b now has 50 GB left, box-a 64: the next goes to box-a, and a third of 40 GB back to box-b (50 > 24).
    assert actions.do_deploy(sized("second", 40), actor="test", node=placement.ANYWHERE).node == "box-a"
    assert actions.do_deploy(sized("third", 40), actor="test", node=placement.ANYWHERE).node == "box-b"


def test_anywhere_refuses_what_fits_on_no_node_naming_each_nodes_room(settings):
    settings.APPLIANCE_NODE = "box-a"
    node("box-a", host_gb=16)
    node("box-b", gpu_gb=24)
    with pytest.raises(actions.ActionRefused, match=r"big \(1342.0 GB\) fits on no up node: box-a has 16.0 GB left, "
                                                    r"box-b has 24.0 GB left"):
        actions.do_deploy(sized("big", 1342), actor="test", node=placement.ANYWHERE)


def test_an_undeployed_variant_frees_its_room(settings):
    settings.APPLIANCE_NODE = "box-a"
    node("box-a", host_gb=10)
    first, second = sized("first", 8), sized("second", 8)
    actions.do_deploy(first, actor="test", node=placement.ANYWHERE)
    with pytest.raises(actions.ActionRefused, match="fits on no up node"):
        actions.do_deploy(second, actor="test", node=placement.ANYWHERE)
    actions.do_undeploy(first, actor="test")
    assert actions.do_deploy(second, actor="test", node=placement.ANYWHERE).node == "box-a"


def test_a_running_deployment_keeps_its_node_until_undeployed(settings):
    settings.APPLIANCE_NODE = "box-a"
    node("box-b")
    model = sized("m", 1)
    actions.do_deploy(model, actor="test", node="box-b")
    with pytest.raises(actions.ActionRefused, match="deployed on node box-b; undeploy it before deploying it on box-a"):
        actions.do_deploy(model, actor="test", node="box-a")
    assert actions.do_deploy(model, actor="test").node == "box-b"  # a plain deploy keeps it where it is
    actions.do_undeploy(model, actor="test")
    assert actions.do_deploy(model, actor="test", node="box-a").node == "box-a"


def test_the_command_line_places_a_deployment_and_names_the_node(settings, capsys):
    settings.APPLIANCE_NODE = "box-a"
    node("box-b")
    sized("m", 1)
    call_command("deploy", "m", "--node", "box-b")
    assert "deploy requested on engine builtin, node box-b" in capsys.readouterr().out
    with pytest.raises(CommandError, match="node ../etc is not a node of this appliance"):
        call_command("deploy", "m", "--node", "../etc")


def test_a_node_reconciles_only_what_is_placed_on_it(settings):
    settings.APPLIANCE_NODE = "box-a"
    node("box-b")
    actions.do_deploy(sized("elsewhere", 1), actor="test", node="box-b")
    reconciler.reconcile_once()  # nothing placed on box-a: nothing to load (the variant has no files to load)
    assert engine_client.names() == []
    assert Deployment.objects.get(variant__name="elsewhere").actual == ActualState.UNDEPLOYED


def test_a_request_here_for_a_model_placed_elsewhere_names_that_node(settings):
    settings.APPLIANCE_NODE = "box-a"
    box_b = node("box-b")
    actions.do_deploy(sized("elsewhere", 1), actor="test", node="box-b")
    actions.do_deploy(sized("here", 1), actor="test")
    assert placement.placed_elsewhere("elsewhere") == box_b
    assert placement.placed_elsewhere("here") is None


def test_replicas_are_named_up_nodes_and_may_change_while_it_runs(settings):
    settings.APPLIANCE_NODE = "box-a"
    node("box-b")
    node("box-c")
    node("box-d", silent_s=3600)
    model = sized("m", 1)
    deployment = actions.do_deploy(model, actor="test", node="box-b", replicas=["box-c", "box-b", "box-c"])
    assert (deployment.node, deployment.replicas) == ("box-b", ["box-c"])  # no repeats, not its own node again
    assert actions.do_deploy(model, actor="test").replicas == ["box-c"]  # a plain deploy keeps them
    with pytest.raises(actions.ActionRefused, match="node box-d is down"):
        actions.do_deploy(model, actor="test", replicas=["box-c", "box-d"])
    with pytest.raises(actions.ActionRefused, match="node box-z is not a node of this appliance"):
        actions.do_deploy(model, actor="test", replicas=["box-z"])
    with pytest.raises(actions.ActionRefused, match="a replica is placed on a named node, not 'anywhere'"):
        actions.do_deploy(model, actor="test", replicas=["anywhere"])
    assert Deployment.objects.get(variant=model).replicas == ["box-c"]  # a refused deploy changed nothing
    assert actions.do_deploy(model, actor="test", replicas=["box-a"]).replicas == ["box-a"]  # running: scaled
    event = AuditEvent.objects.filter(action="deployment.deploy").order_by("-seq").first()
    assert (event.details["placed_on"], event.details["replicas"]) == ("box-b", ["box-a"])


def test_a_replica_counts_against_its_nodes_memory(settings):
    settings.APPLIANCE_NODE = "box-a"
    node("box-b", host_gb=10)
    node("box-c", host_gb=10)
    actions.do_deploy(sized("big", 8), actor="test", node="box-b", replicas=["box-c"])
    assert placement.placed_bytes("box-c") == 8 * GB
    with pytest.raises(actions.ActionRefused, match="fits on no up node"):
        actions.do_deploy(sized("more", 4), actor="test", node="anywhere")


def test_a_replica_node_serves_it_and_a_request_there_is_not_sent_elsewhere(settings):
    settings.APPLIANCE_NODE = "box-a"
    node("box-b")
    actions.do_deploy(sized("twin", 1), actor="test", node="box-b", replicas=["box-a"])
    assert [placement.served_by_this_node(d) for d in Deployment.objects.all()] == [True]
    assert reconciler.is_replica(Deployment.objects.get())
    assert placement.placed_elsewhere("twin") is None  # this node serves it: no 503 naming another node


def test_a_replicas_failed_load_leaves_the_deployments_state_alone_and_is_not_retried_every_tick(settings, tmp_path):
    settings.APPLIANCE_NODE = settings.AUDIT_NODE = "box-a"
    settings.MODEL_STORE = tmp_path
    node("box-b")
    model = sized("twin", 1)
    (tmp_path / "twin").mkdir()
    (tmp_path / "twin" / "config.json").write_text("{}")  # box-a's copy, which its (empty) manifest lacks
    actions.do_deploy(model, actor="test", node="box-b", replicas=["box-a"])
    reconciler.reconcile_once()
    reconciler.reconcile_once()  # not tried again every tick
    loads = AuditEvent.objects.filter(action="deployment.load", target="twin")
    assert [(e.outcome, e.details["replica"], e.details["node"]) for e in loads] == [("refused", True, "box-a")]
    assert Deployment.objects.get(variant=model).actual == ActualState.UNDEPLOYED  # box-b's state, untouched
    # Its files do not match the manifest, and no node has a ready copy: the variant is quarantined for every node.
    model.refresh_from_db()
    assert model.status == "quarantined"
    assert dict(model.copies.values_list("node", "state")) == {"box-a": "quarantined"}
