"""The fit plan of a variant as an external engine's command lines (vLLM's or SGLang's), for `fit --engine-flags`
and `deploy --plan` alike, and each engine's own parser's verdict on them."""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from inference.fit.engine_flags import ENGINE_NAMES, RPC_PORT, NodeLaunch, node_launches
from inference.fit.hardware import HardwareSpec, inventory, parse_hardware
from inference.fit.parallel import Plan, default_plan, parse_plan

from . import engines

# Each script parses every command line with the engine's own `serve` parser, in the engine's interpreter, and
# prints, as its last line, the JSON list of verdicts: "ok" or the parser's complaint.
PARSE_SCRIPTS = {
    # vLLM: make_arg_parser, the parser of `vllm serve`.
    "vllm": """
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
def parser():
    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
""",
    # SGLang: ServerArgs.add_cli_args, the arguments of `sglang serve`.
    "sglang": """
import argparse, warnings
warnings.simplefilter("ignore")
from sglang.srt.server_args import ServerArgs
def parser():
    made = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(made)
    return made
""",
}
PARSE_LOOP = """
import contextlib, io, json, sys
verdicts = []
for args in json.loads(sys.argv[1]):
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parser().parse_args(args)
        verdicts.append("ok")
    except SystemExit:
        verdicts.append((errors.getvalue().strip().splitlines() or ["refused"])[-1])
print(json.dumps(verdicts))
"""
PARSE_TIMEOUT_S = 300  # importing vLLM takes half a minute on a busy CPU


@dataclass
class EnginePlan:
    """A plan over some hardware and the engine's command line on each node."""

    engine: str
    plan: Plan
    hardware: HardwareSpec
    launches: list[NodeLaunch]

    def describe(self, model_dir: str) -> str:
        """Return the per-node commands as text, the head first."""
        lines = [f"{ENGINE_NAMES[self.engine]} for plan {self.plan.label} on {self.hardware.label}:"]
        for launch in self.launches:
            role = " (head: serves the API on 127.0.0.1)" if launch.node == 0 and len(self.launches) > 1 else ""
            lines.append(f"  node {launch.node}{role}: {launch.command(model_dir)}")
        return "\n".join(lines)


def launch_plan(engine: str, hardware: str | None, plan: str | None, context: int | None, dtype: str = "stored",
                head: str | None = None, rpc_port: int = RPC_PORT) -> EnginePlan:
    """Return the launches of `plan` (default: the engine's usual plan) for `engine` on `hardware` (default: this
    box).

    Raises PlanError or HardwareSpecError (both ValueError) naming what does not fit together.
    """
    hw = inventory(measure=False) if hardware is None else parse_hardware(hardware)
    chosen = parse_plan(plan, hw.gpus) if plan else default_plan(engine, hw.gpus, moe=False, latent_kv=False)
    extra = {"head": head} if head else {}
    return EnginePlan(engine, chosen, hw, node_launches(chosen, hw, context, dtype, engine=engine, rpc_port=rpc_port,
                                                        **extra))


def engine_python(engine: str) -> str:
    """Return the interpreter setting of an external engine (empty where it is not installed)."""
    return {"vllm": settings.VLLM_PYTHON, "sglang": settings.SGLANG_PYTHON}[engine]


def check_flags(engine: str, launches: list[NodeLaunch], model_dir: str) -> list[str] | None:
    """Return the engine's own parser's verdict on each launch ("ok" or its complaint), or None where the engine is
    not installed."""
    python = engine_python(engine)
    if not engines.installed(python):
        return None
    from .vllm_engine import engine_environment  # here: it loads the tokenizer stack, which planning never needs

    home = Path(settings.APPLIANCE_HOME) / "engines" / engine
    home.mkdir(parents=True, exist_ok=True)
    lists = [launch.argv(model_dir) for launch in launches]
    result = subprocess.run([python, "-c", PARSE_SCRIPTS[engine] + PARSE_LOOP, json.dumps(lists)],
                            capture_output=True, text=True, cwd=home, env=engine_environment(home),
                            timeout=PARSE_TIMEOUT_S)
    try:
        verdicts = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        verdicts = None
    if result.returncode != 0 or not isinstance(verdicts, list) or len(verdicts) != len(lists):
        return [f"{ENGINE_NAMES[engine]}'s parser did not run: {result.stderr.strip()[-300:]}"] * len(lists)
    return verdicts
