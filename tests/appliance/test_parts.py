"""A deployment over several nodes as parts of one vLLM engine: what deploy stores and refuses, each node's
arguments, and the part's ledger events (the real engine over two nodes: tests/e2e/test_vllm_over_nodes.py)."""
import pytest
from django.core.management import CommandError, call_command

from appliance import actions, engines, importer
from appliance.management.commands import deploy
from appliance.models import ActualState, Deployment, Node, VariantStatus
from audit.models import AuditEvent
from inference.fit import engine_flags
from inference.fit.hardware import parse_hardware


def flag(flags: list[str], name: str) -> str | None:
    return flags[flags.index(name) + 1] if name in flags else None


def register(name: str, host: str) -> None:
    actions.do_register_node(name, address=f"http://{host}:8000", version="0.1.0", gpus=[], memory_bytes=2**34,
                             actor="test", queue=f"q-{name}")


@pytest.fixture
def variant(demo_dir, django_capture_on_commit_callbacks, db, settings):
    settings.APPLIANCE_NODE = "node-1"
    for index in (1, 2, 3):
        register(f"node-{index}", f"10.0.0.{index}")
    with django_capture_on_commit_callbacks(execute=False):
        variant = actions.do_start_import(name="demo-dense", kind="dense", source_path=str(demo_dir / "demo-dense"),
                                          actor="test")
    importer.run_import(variant.pk)
    return variant


def test_deploy_over_parts_runs_one_rank_per_node_with_the_head_named_at_launch(variant, capsys):
    call_command("deploy", "demo-dense", "--engine", "vllm", "--part", "node-2", "--part", "node-3",
                 "--rpc-port", "14000")
    assert "node node-1 (the head), parts on node-2, node-3" in capsys.readouterr().out
    dep = Deployment.objects.get(variant=variant)
    assert dep.parts == ["node-2", "node-3"] and dep.replicas == []
    assert flag(dep.engine_flags, "--data-parallel-size") == "3"
    assert flag(dep.engine_flags, "--data-parallel-size-local") == "1"
    assert flag(dep.engine_flags, "--data-parallel-address") == engine_flags.HEAD_PLACEHOLDER
    assert flag(dep.engine_flags, "--data-parallel-rpc-port") == "14000"
    event = AuditEvent.objects.filter(action="deployment.deploy").latest("seq")
    assert event.details["parts"] == ["node-2", "node-3"]

    head, head_peers, head_host = engines.across_nodes(dep, "node-1")
    assert flag(head, "--data-parallel-address") == "10.0.0.1" and "--headless" not in head
    assert head_peers == ["10.0.0.2", "10.0.0.3"] and head_host == "10.0.0.1"
    last, last_peers, last_host = engines.across_nodes(dep, "node-3")
    assert flag(last, "--data-parallel-address") == "10.0.0.1" and "--headless" in last
    assert flag(last, "--data-parallel-start-rank") == "2" and last_peers == ["10.0.0.1", "10.0.0.2"]
    assert last_host == "10.0.0.3"
    Node.objects.filter(name="node-2").update(address="")
    with pytest.raises(engines.EngineUnavailable, match="node node-2 of demo-dense's deployment has no registered"):
        engines.across_nodes(dep, "node-1")


@pytest.mark.parametrize("args, refusal", [
    (["--part", "node-2"], "--part runs parts of one vLLM engine on other nodes: deploy with --engine vllm"),
    (["--engine", "vllm", "--part", "node-9"], "node node-9 is not a node of this appliance"),
    (["--engine", "vllm", "--part", "anywhere"], "a part is placed on a named node, not 'anywhere'"),
    (["--engine", "vllm", "--part", "node-2", "--replica", "node-3"],
     "cannot have replicas .node-3. and parts on other nodes at once"),
])
def test_deploy_refuses_parts_it_cannot_run(variant, args, refusal):
    with pytest.raises(CommandError, match=refusal):
        call_command("deploy", "demo-dense", *args)
    assert not Deployment.objects.filter(desired="deployed").exists()


def test_parts_need_vllm_and_the_arguments_that_say_how(variant):
    with pytest.raises(actions.ActionRefused, match="only vLLM's data-parallel mode does; deploy it with --engine "
                                                    "vllm, not builtin"):
        actions.do_deploy(variant, actor="test", parts=["node-2"], engine_flags=["--data-parallel-size", "2"])
    with pytest.raises(actions.ActionRefused, match="do not run it over several nodes"):
        actions.do_deploy(variant, actor="test", engine="vllm", parts=["node-2"], engine_flags=[])


def test_a_running_deployment_keeps_its_parts_until_undeployed(variant):
    call_command("deploy", "demo-dense", "--engine", "vllm", "--part", "node-2")
    Deployment.objects.filter(variant=variant).update(actual=ActualState.DEPLOYED)
    with pytest.raises(CommandError, match="deployed over nodes node-1, node-2; undeploy it before changing its parts"):
        call_command("deploy", "demo-dense", "--engine", "vllm", "--part", "node-3")
    call_command("deploy", "demo-dense", "--engine", "vllm", "--part", "node-2")  # the same parts: nothing changes


def test_a_plan_over_two_boxes_needs_a_part_for_the_second(variant, monkeypatch):
    # A box with 8 GPUs, as inventory() would find on a GPU box (there is none here): the refusal on this CPU box
    # (no CUDA device) is tested in tests/fit/test_engine_flags.py.
    import inference.fit.hardware as hardware

    monkeypatch.setattr(hardware, "inventory", lambda measure=False: parse_hardware("8xH200"))
    with pytest.raises(CommandError, match="runs on 2 box.es., and the deployment names 1 node.s. .* name 1 other"):
        call_command("deploy", "demo-dense", "--engine", "vllm", "--plan", "dp16-ep16", "--hardware", "2x8xH200")
    call_command("deploy", "demo-dense", "--engine", "vllm", "--plan", "dp16-ep16", "--hardware", "2x8xH200",
                 "--part", "node-2")
    dep = Deployment.objects.get(variant=variant)
    assert flag(dep.engine_flags, "--data-parallel-size") == "16"
    assert flag(dep.engine_flags, "--data-parallel-size-local") == "8"
    part, _, _ = engines.across_nodes(dep, "node-2")
    assert flag(part, "--data-parallel-start-rank") == "8" and "--enable-expert-parallel" in part


def test_a_parts_events_name_its_place_and_leave_the_deployment_to_its_head(variant):
    call_command("deploy", "demo-dense", "--engine", "vllm", "--part", "node-2")
    dep = Deployment.objects.get(variant=variant)
    actions.do_record_load(dep.pk, "demo-dense", outcome="ok", actor="test", part=1, details={"pid": 7})
    actions.do_record_unload("demo-dense", actor="test", part=1)
    dep.refresh_from_db()
    variant.refresh_from_db()
    assert (dep.actual, variant.status) == (ActualState.UNDEPLOYED, VariantStatus.READY)
    loads = AuditEvent.objects.filter(action__in=["deployment.load", "deployment.unload"]).order_by("seq")
    assert [(e.action, e.details.get("part"), "replica" in e.details) for e in loads] == [
        ("deployment.load", 1, False), ("deployment.unload", 1, False)]


def test_deploys_default_port_is_the_plans():
    assert deploy.RPC_PORT == engine_flags.RPC_PORT  # deploy keeps its own copy so as not to load torch


def test_a_parts_engine_may_reach_the_deployments_other_nodes_and_nothing_else_off_loopback():
    """In a fresh interpreter, as vLLM's sitecustomize runs it (the guard, once installed, stays): the policy is
    asked, nothing is sent."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("from audit import egress\nfrom inference.vllm_guard import guard_this_interpreter\n"
              "guard_this_interpreter()\nview = egress.guard()\n"
              "print(view.allows_address('10.0.0.1', 13345), view.allows_address('10.0.0.9', 13345), "
              "view.allows_address('127.0.0.1', 80))")
    env = {"PATH": "/usr/bin:/bin", "APPLIANCE_ENGINE_PEERS": "10.0.0.1,10.0.0.2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["True", "False", "True"], out.stderr
