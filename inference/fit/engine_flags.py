"""The fit plan as vLLM's arguments: one box's flags, and for a plan over several boxes each node's command.

A Plan (inference.fit.parallel) says how one deployment splits the model over its GPUs; vLLM says the same with
--tensor-parallel-size (inside one attention group), --data-parallel-size (attention groups and replicas) and
--enable-expert-parallel (whole experts per GPU instead of every expert split). Over several boxes, vLLM's
data-parallel mode runs DP ranks on every node: the head serves the API and the others run `--headless`, each
with its first rank (vLLM's multi-node data-parallel deployment). The flags are shown before deploy and checked
against vLLM's own parser where vLLM is installed (appliance.vllm_engine.check_flags).
"""
from __future__ import annotations

from dataclasses import dataclass

from .hardware import HardwareSpec
from .parallel import Plan, PlanError

# The share of each GPU's memory vLLM may take (its --gpu-memory-utilization): what the advisor leaves after the
# runtime reserve it plans with (roofline.RUNTIME_RESERVE_GB_PER_GPU), rounded down to vLLM's own default.
GPU_MEMORY_FRACTION = 0.90
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # the advisor's weight dtypes vLLM computes in
RPC_PORT = 13345  # the head's port for the other nodes' DP ranks (--data-parallel-rpc-port)
HEAD_PLACEHOLDER = "HEAD_NODE_ADDRESS"


@dataclass(frozen=True)
class NodeLaunch:
    """One node's part of a deployment: its rank among the boxes and vLLM's arguments there."""

    node: int
    args: tuple[str, ...]

    def command(self, model_dir: str) -> str:
        """Return the shell command that starts this node's part (what that node's worker runs)."""
        return " ".join(["vllm", "serve", model_dir, *self.args])


def vllm_flags(plan: Plan, context: int | None, dtype: str, kv_dtype: str | None = None) -> list[str]:
    """Return vLLM's arguments for one box running `plan` with `context` tokens per sequence (None: the model's)."""
    if plan.offload:
        raise PlanError(f"plan {plan.label!r} offloads the experts to host RAM, which vLLM does not do; "
                        "deploy it on the builtin engine or drop -offload")
    data_parallel = plan.replicas * plan.attention_dp
    flags = ["--tensor-parallel-size", str(plan.attention_tp), "--gpu-memory-utilization", f"{GPU_MEMORY_FRACTION:.2f}"]
    if context is not None:
        flags += ["--max-model-len", str(context)]
    if data_parallel > 1:
        flags += ["--data-parallel-size", str(data_parallel)]
    if plan.experts == "ep":
        flags.append("--enable-expert-parallel")
    if dtype in DTYPES:
        flags += ["--dtype", DTYPES[dtype]]
    if kv_dtype == "fp8":
        flags += ["--kv-cache-dtype", "fp8"]
    return flags


def node_launches(plan: Plan, hw: HardwareSpec, context: int | None, dtype: str, head: str = HEAD_PLACEHOLDER,
                  kv_dtype: str | None = None) -> list[NodeLaunch]:
    """Return each node's vLLM arguments for `plan` over hw's boxes (one NodeLaunch for a single box)."""
    flags = vllm_flags(plan, context, dtype, kv_dtype)
    if hw.boxes <= 1:
        return [NodeLaunch(0, tuple(flags))]
    data_parallel = plan.replicas * plan.attention_dp
    if plan.attention_tp > hw.gpus_per_box or data_parallel % hw.boxes:
        raise PlanError(f"plan {plan.label!r} over {hw.boxes} boxes of {hw.gpus_per_box} GPUs needs tensor "
                        "parallelism across boxes, which vLLM's data-parallel mode does not launch; "
                        f"write dp{plan.gpus}-ep{plan.gpus} (or epN) for a Mixture-of-Experts model")
    local = data_parallel // hw.boxes
    shared = [*flags, "--data-parallel-size-local", str(local), "--data-parallel-address", head,
              "--data-parallel-rpc-port", str(RPC_PORT)]
    launches = [NodeLaunch(0, tuple(shared))]
    for node in range(1, hw.boxes):
        launches.append(NodeLaunch(node, (*shared, "--headless", "--data-parallel-start-rank", str(node * local))))
    return launches


def missing_for(plan: Plan, hw: HardwareSpec, box_gpus: int) -> str | None:
    """Return what this box lacks to start its part of `plan` (GPUs), or None when it has it."""
    wanted = plan.gpus // max(1, hw.boxes)
    if plan.gpus <= 1 and hw.boxes <= 1:
        return None  # one copy on one device: a GPU, or the host's CPU (vLLM's CPU build)
    if box_gpus == 0:
        return (f"plan {plan.label!r} runs vLLM on {wanted} GPU(s) per box, and this box has no CUDA device "
                "(torch.cuda.is_available() is false)")
    if box_gpus < wanted:
        return f"plan {plan.label!r} runs vLLM on {wanted} GPU(s) per box, and this box has {box_gpus}"
    return None
