"""The fit plan as an engine's arguments (vLLM's or SGLang's): one box's flags, and over several boxes each node's.

A Plan (inference.fit.parallel) says how one deployment splits the model over its GPUs.
- vLLM says the same with --tensor-parallel-size (inside one attention group), --data-parallel-size (attention
  groups and replicas) and --enable-expert-parallel (whole experts per GPU instead of every expert split). Over
  several boxes, its data-parallel mode runs DP ranks on every node: the head serves the API and the others run
  `--headless`, each with its first rank (vLLM's multi-node data-parallel deployment).
- SGLang's TP group is the whole replica (--tp-size), with --attn-dp-size attention groups inside it, --ep-size for
  whole experts per GPU and --dp-size replicas. Over several boxes, one TP group spans them all: every node runs
  the same command with its --node-rank, rank 0 serving the API (SGLang's multi-node launch).
The flags are shown before deploy and checked against the engine's own parser where it is installed
(appliance.engine_plan.check_flags).
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from .hardware import HardwareSpec
from .parallel import Plan, PlanError

# The share of each GPU's memory vLLM may take (its --gpu-memory-utilization): what the advisor leaves after the
# runtime reserve it plans with (roofline.RUNTIME_RESERVE_GB_PER_GPU), rounded down to vLLM's own default.
GPU_MEMORY_FRACTION = 0.90
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # the advisor's weight dtypes vLLM computes in
# SGLang's --mem-fraction-static is the share for weights and KV alone; unlike vLLM's figure it leaves out
# activations and CUDA graphs, which take the rest.
SGLANG_STATIC_FRACTION = 0.85
SGLANG_KV_DTYPES = {"fp8": "fp8_e4m3"}
# Steps between vLLM's EPLB load reports: each report syncs the GPUs once, so not every step.
EPLB_LOG_INTERVAL = 100
RPC_PORT = 13345  # vLLM: the head's port for the other nodes' DP ranks (--data-parallel-rpc-port)
DIST_PORT = 25000  # SGLang: the head's port for initialising the distributed backend (--dist-init-addr)
HEAD_PLACEHOLDER = "HEAD_NODE_ADDRESS"
ENGINE_NAMES = {"vllm": "vLLM", "sglang": "SGLang"}


@dataclass(frozen=True)
class NodeLaunch:
    """One node's part of a deployment: its rank among the boxes and the engine's arguments there."""

    node: int
    args: tuple[str, ...]
    engine: str = "vllm"

    def argv(self, model_dir: str) -> list[str]:
        """Return what the engine's own `serve` parser reads: the model directory and the arguments."""
        model = [model_dir] if self.engine == "vllm" else ["--model-path", model_dir]
        return [*model, *self.args]

    def command(self, model_dir: str) -> str:
        """Return the shell command that starts this node's part."""
        return shlex.join([self.engine, "serve", *self.argv(model_dir)])


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
        # Whole experts per GPU, balanced by vLLM's EPLB, which logs each rank's load every EPLB_LOG_INTERVAL
        # steps: the expert load the appliance's /metrics carries (appliance.vllm_engine.eplb_figures).
        flags += ["--enable-expert-parallel", "--enable-eplb", "--eplb-config",
                  json.dumps({"log_balancedness": True, "log_balancedness_interval": EPLB_LOG_INTERVAL})]
    if dtype in DTYPES:
        flags += ["--dtype", DTYPES[dtype]]
    if kv_dtype == "fp8":
        flags += ["--kv-cache-dtype", "fp8"]
    return flags


def sglang_flags(plan: Plan, context: int | None, dtype: str, kv_dtype: str | None = None) -> list[str]:
    """Return SGLang's arguments for one box running `plan` with `context` tokens per sequence (None: the model's)."""
    if plan.offload:
        raise PlanError(f"plan {plan.label!r} offloads the experts to host RAM, which SGLang does not do; "
                        "deploy it on the builtin engine or drop -offload")
    flags = ["--tp-size", str(plan.replica_gpus), "--mem-fraction-static", f"{SGLANG_STATIC_FRACTION:.2f}"]
    if plan.attention_dp > 1:
        flags += ["--attn-dp-size", str(plan.attention_dp)]
    if plan.replicas > 1:
        flags += ["--dp-size", str(plan.replicas)]
    if plan.experts == "ep":
        flags += ["--ep-size", str(plan.replica_gpus)]
    if context is not None:
        flags += ["--context-length", str(context)]
    if dtype in DTYPES:
        flags += ["--dtype", DTYPES[dtype]]
    if kv_dtype in SGLANG_KV_DTYPES:
        flags += ["--kv-cache-dtype", SGLANG_KV_DTYPES[kv_dtype]]
    return flags


def node_launches(plan: Plan, hw: HardwareSpec, context: int | None, dtype: str, head: str = HEAD_PLACEHOLDER,
                  kv_dtype: str | None = None, engine: str = "vllm", rpc_port: int = RPC_PORT) -> list[NodeLaunch]:
    """Return each node's arguments of `engine` for `plan` over hw's boxes (one NodeLaunch for a single box)."""
    if engine == "sglang":
        return sglang_launches(plan, hw, context, dtype, head, kv_dtype)
    if engine != "vllm":
        raise PlanError(f"the {engine} engine takes no fit plan as flags; plan for vllm or sglang")
    flags = vllm_flags(plan, context, dtype, kv_dtype)
    if hw.boxes <= 1:
        return [NodeLaunch(0, tuple(flags))]
    data_parallel = plan.replicas * plan.attention_dp
    if plan.attention_tp > hw.gpus_per_box or data_parallel % hw.boxes:
        raise PlanError(f"plan {plan.label!r} over {hw.boxes} boxes of {hw.gpus_per_box} GPUs needs tensor "
                        "parallelism across boxes, which vLLM's data-parallel mode does not launch; "
                        f"write dp{plan.gpus}-ep{plan.gpus} (or epN) for a Mixture-of-Experts model")
    shared = over_boxes(flags, data_parallel // hw.boxes, head, rpc_port)
    return [NodeLaunch(node, tuple(part_args(shared, node))) for node in range(hw.boxes)]


def over_boxes(flags: list[str], local: int, head: str = HEAD_PLACEHOLDER, rpc_port: int = RPC_PORT) -> list[str]:
    """Return vLLM's arguments shared by every node of a data-parallel deployment over several boxes: `flags` (with
    --data-parallel-size, every box's ranks) and `local` ranks per box, reaching the head at head:rpc_port."""
    return [*flags, "--data-parallel-size-local", str(local), "--data-parallel-address", head,
            "--data-parallel-rpc-port", str(rpc_port)]


def part_args(shared: list[str], node: int) -> list[str]:
    """Return node `node`'s vLLM arguments (0: the head, which serves the API; others run `--headless` from their
    first rank) from the shared arguments of a deployment over several boxes."""
    if node == 0:
        return list(shared)
    local = int(shared[shared.index("--data-parallel-size-local") + 1])
    return [*shared, "--headless", "--data-parallel-start-rank", str(node * local)]


def with_head(args: list[str], head: str) -> list[str]:
    """Return args with the head node's address in place of HEAD_PLACEHOLDER (what a deployment stores)."""
    return [head if arg == HEAD_PLACEHOLDER else arg for arg in args]


def sglang_launches(plan: Plan, hw: HardwareSpec, context: int | None, dtype: str, head: str = HEAD_PLACEHOLDER,
                    kv_dtype: str | None = None) -> list[NodeLaunch]:
    """Return each node's SGLang arguments for `plan` over hw's boxes: one TP group over them all, rank 0 the head."""
    flags = sglang_flags(plan, context, dtype, kv_dtype)
    if hw.boxes <= 1:
        return [NodeLaunch(0, tuple(flags), "sglang")]
    if plan.replicas > 1:
        raise PlanError(f"plan {plan.label!r} over {hw.boxes} boxes runs {plan.replicas} replicas, and SGLang's "
                        "multi-node launch runs one TP group over every box; deploy one replica per box instead "
                        "(deploy --replica NODE), or plan one group (e.g. ep16, tp16)")
    shared = [*flags, "--nnodes", str(hw.boxes), "--dist-init-addr", f"{head}:{DIST_PORT}"]
    return [NodeLaunch(node, (*shared, "--node-rank", str(node)), "sglang") for node in range(hw.boxes)]


def missing_for(plan: Plan, hw: HardwareSpec, box_gpus: int, engine: str = "vllm") -> str | None:
    """Return what this box lacks to start its part of `plan` on `engine` (GPUs), or None when it has it."""
    wanted, name = plan.gpus // max(1, hw.boxes), ENGINE_NAMES.get(engine, engine)
    if box_gpus == 0 and engine == "sglang":
        return ("SGLang runs on CUDA GPUs only (its PyPI build has no CPU kernels), and this box has no CUDA "
                "device (torch.cuda.is_available() is false)")
    if plan.gpus <= 1 and hw.boxes <= 1:
        return None  # one copy on one device: a GPU, or the host's CPU (vLLM's CPU build)
    if box_gpus == 0:
        return (f"plan {plan.label!r} runs {name} on {wanted} GPU(s) per box, and this box has no CUDA device "
                "(torch.cuda.is_available() is false)")
    if box_gpus < wanted:
        return f"plan {plan.label!r} runs {name} on {wanted} GPU(s) per box, and this box has {box_gpus}"
    return None
