"""The fit plan as vLLM's and SGLang's arguments: one box's flags, each node's command over several boxes, deploy's
refusals."""
import pytest
from django.core.management import CommandError, call_command

from appliance import actions, importer
from appliance.engine_plan import launch_plan
from appliance.models import Deployment
from inference.fit.engine_flags import NodeLaunch, missing_for, node_launches, sglang_flags, vllm_flags
from inference.fit.hardware import parse_hardware
from inference.fit.parallel import PlanError, parse_plan


def flag(flags: list[str] | tuple[str, ...], name: str) -> str | None:
    return flags[flags.index(name) + 1] if name in flags else None


@pytest.mark.parametrize("plan,tp,dp,ep", [("tp8", "8", None, False), ("dp8-ep8", "1", "8", True),
                                           ("ep8", "1", "8", True), ("tp8-dpattn", "1", "8", False),
                                           ("dp4-tp2", "2", "4", False)])
def test_each_plan_becomes_vllms_parallel_sizes(plan, tp, dp, ep):
    flags = vllm_flags(parse_plan(plan, 8), 8192, "bf16")
    assert flag(flags, "--tensor-parallel-size") == tp
    assert flag(flags, "--data-parallel-size") == dp
    assert ("--enable-expert-parallel" in flags) is ep
    assert flag(flags, "--max-model-len") == "8192" and flag(flags, "--dtype") == "bfloat16"
    assert flag(flags, "--gpu-memory-utilization") == "0.90"


def test_the_models_own_context_and_dtype_are_left_to_vllm_when_not_planned():
    flags = vllm_flags(parse_plan("tp1", 0), None, "stored")
    assert "--max-model-len" not in flags and "--dtype" not in flags


def test_an_offload_plan_is_refused_for_vllm():
    with pytest.raises(PlanError, match="vLLM does not do"):
        vllm_flags(parse_plan("tp8-offload", 8), 4096, "bf16")


def test_expert_parallelism_over_two_boxes_is_one_head_and_one_headless_node():
    hw = parse_hardware("2x8xH200")
    head, other = node_launches(parse_plan("dp16-ep16", hw.gpus), hw, 4096, "bf16", head="10.0.0.1")
    for launch in (head, other):
        assert flag(launch.args, "--data-parallel-size") == "16"
        assert flag(launch.args, "--data-parallel-size-local") == "8"
        assert flag(launch.args, "--data-parallel-address") == "10.0.0.1"
        assert "--enable-expert-parallel" in launch.args
    assert "--headless" not in head.args
    assert "--headless" in other.args and flag(other.args, "--data-parallel-start-rank") == "8"
    assert other.command("/models/r1").startswith("vllm serve /models/r1 --tensor-parallel-size 1")


def test_tensor_parallelism_across_boxes_is_refused_naming_the_way_that_works():
    hw = parse_hardware("2x8xH200")
    with pytest.raises(PlanError, match="write dp16-ep16"):
        node_launches(parse_plan("tp16", hw.gpus), hw, 4096, "bf16")


def test_a_box_without_gpus_is_told_what_it_lacks():
    hw = parse_hardware("2x8xH200")
    plan = parse_plan("dp16-ep16", hw.gpus)
    assert missing_for(plan, hw, 0) == ("plan 'dp16-ep16' runs vLLM on 8 GPU(s) per box, and this box has no "
                                        "CUDA device (torch.cuda.is_available() is false)")
    assert missing_for(plan, hw, 4) == "plan 'dp16-ep16' runs vLLM on 8 GPU(s) per box, and this box has 4"
    assert missing_for(plan, hw, 8) is None


def test_fit_prints_every_nodes_command(capsys, settings):
    settings.VLLM_PYTHON = ""
    call_command("fit", "/models/r1", "--engine-flags", "--plan", "dp16-ep16", "--hardware", "2x8xH200",
                 "--context", "8192", "--head-address", "10.0.0.1")
    out = capsys.readouterr().out
    planned = launch_plan("vllm", "2x8xH200", "dp16-ep16", 8192, head="10.0.0.1")
    assert planned.describe("/models/r1") in out
    assert "node 0 (head: serves the API on 127.0.0.1): vllm serve /models/r1" in out
    assert "node 1: vllm serve /models/r1" in out and "--headless" in out
    assert "not checked with vLLM's parser: vLLM is not installed here" in out
    assert all(isinstance(launch, NodeLaunch) for launch in planned.launches)


@pytest.fixture
def variant(demo_dir, django_capture_on_commit_callbacks, db):
    with django_capture_on_commit_callbacks(execute=False):
        variant = actions.do_start_import(name="demo-dense", kind="dense", source_path=str(demo_dir / "demo-dense"),
                                          actor="test")
    importer.run_import(variant.pk)
    return variant


def test_deploy_with_a_multi_node_plan_refuses_on_a_box_without_gpus(variant):
    with pytest.raises(CommandError, match="deploy refused: plan 'dp16-ep16' runs vLLM on 8 GPU.s. per box, and "
                                           "this box has no CUDA device"):
        call_command("deploy", "demo-dense", "--engine", "vllm", "--plan", "dp16-ep16", "--hardware", "2x8xH200")
    with pytest.raises(CommandError, match="deploy refused: plan 'tp2' splits over 2 GPUs but the hardware has none"):
        call_command("deploy", "demo-dense", "--engine", "vllm", "--plan", "tp2")
    assert not Deployment.objects.exists()


def test_deploy_with_a_plan_stores_its_flags_for_vllm(variant, capsys):
    call_command("deploy", "demo-dense", "--engine", "vllm", "--plan", "tp1", "--context", "512")
    flags = Deployment.objects.get(variant__name="demo-dense").engine_flags
    assert flag(flags, "--tensor-parallel-size") == "1" and flag(flags, "--max-model-len") == "512"


def test_a_plan_is_for_an_external_engine_only(variant):
    with pytest.raises(CommandError, match="deploy with --engine vllm or --engine sglang"):
        call_command("deploy", "demo-dense", "--plan", "tp1")


@pytest.mark.parametrize("plan,tp,attn_dp,dp,ep", [("tp8", "8", None, None, None), ("dp8-ep8", "8", "8", None, "8"),
                                                   ("ep8", "8", "8", None, "8"), ("tp8-dpattn", "8", "8", None, None),
                                                   ("dp4-tp2", "2", None, "4", None), ("dp8", "1", None, "8", None)])
def test_each_plan_becomes_sglangs_parallel_sizes(plan, tp, attn_dp, dp, ep):
    flags = sglang_flags(parse_plan(plan, 8), 8192, "bf16", "fp8")
    assert flag(flags, "--tp-size") == tp and flag(flags, "--attn-dp-size") == attn_dp
    assert flag(flags, "--dp-size") == dp and flag(flags, "--ep-size") == ep
    assert flag(flags, "--context-length") == "8192" and flag(flags, "--dtype") == "bfloat16"
    assert flag(flags, "--kv-cache-dtype") == "fp8_e4m3" and flag(flags, "--mem-fraction-static") == "0.85"


def test_an_offload_plan_is_refused_for_sglang():
    with pytest.raises(PlanError, match="SGLang does not do"):
        sglang_flags(parse_plan("tp8-offload", 8), 4096, "bf16")


def test_sglang_over_two_boxes_is_one_group_with_a_rank_per_node():
    hw = parse_hardware("2x8xH200")
    launches = node_launches(parse_plan("ep16", hw.gpus), hw, 4096, "bf16", head="10.0.0.1", engine="sglang")
    assert [flag(launch.args, "--node-rank") for launch in launches] == ["0", "1"]
    for launch in launches:
        assert flag(launch.args, "--nnodes") == "2" and flag(launch.args, "--dist-init-addr") == "10.0.0.1:25000"
        assert flag(launch.args, "--tp-size") == "16" and flag(launch.args, "--ep-size") == "16"
    assert launches[1].command("/models/r1").startswith("sglang serve --model-path /models/r1 --tp-size 16")
    with pytest.raises(PlanError, match="deploy one replica per box instead"):
        node_launches(parse_plan("dp2-tp8", hw.gpus), hw, 4096, "bf16", engine="sglang")


def test_fit_prints_sglangs_commands_and_says_when_they_were_not_checked(capsys, settings):
    settings.SGLANG_PYTHON = ""
    call_command("fit", "/models/r1", "--engine-flags", "--engine", "sglang", "--plan", "ep16", "--hardware",
                 "2x8xH200", "--head-address", "10.0.0.1")
    out = capsys.readouterr().out
    assert "SGLang for plan ep16 on 2x8xH200" in out
    assert "node 0 (head: serves the API on 127.0.0.1): sglang serve --model-path /models/r1" in out
    assert "--node-rank 1" in out
    assert "not checked with SGLang's parser: SGLang is not installed here (APPLIANCE_SGLANG_PYTHON)" in out
    with pytest.raises(CommandError, match="plans for vllm or sglang, not 'builtin'"):
        call_command("fit", "/models/r1", "--engine-flags", "--engine", "builtin")


def test_deploy_on_sglang_with_a_plan_refuses_on_a_box_without_cuda(variant):
    with pytest.raises(CommandError, match="deploy refused: SGLang runs on CUDA GPUs only .* this box has no CUDA"):
        call_command("deploy", "demo-dense", "--engine", "sglang", "--plan", "tp1")
    assert not Deployment.objects.exists()
