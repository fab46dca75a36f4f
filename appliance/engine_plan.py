"""The fit plan of a variant as vLLM's command lines, for `fit --vllm-flags` and `deploy --plan` alike."""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from inference.fit.engine_flags import NodeLaunch, node_launches
from inference.fit.hardware import HardwareSpec, inventory, parse_hardware
from inference.fit.parallel import Plan, default_plan, parse_plan

from . import engines

# Parses each command line with vLLM's own `vllm serve` parser (make_arg_parser), in vLLM's interpreter; prints
# one line per command line: "ok" or the parser's complaint.
PARSE_SCRIPT = """
import contextlib, io, json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
for args in json.loads(sys.argv[1]):
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).parse_args(args)
        print("ok")
    except SystemExit:
        print(errors.getvalue().strip().splitlines()[-1])
"""
PARSE_TIMEOUT_S = 300  # importing vLLM takes half a minute on a busy CPU


@dataclass
class EnginePlan:
    """A plan over some hardware and the vLLM command line of each node."""

    plan: Plan
    hardware: HardwareSpec
    launches: list[NodeLaunch]

    def describe(self, model_dir: str) -> str:
        """Return the per-node commands as text, the head first."""
        lines = [f"vLLM for plan {self.plan.label} on {self.hardware.label}:"]
        for launch in self.launches:
            role = " (head: serves the API on 127.0.0.1)" if launch.node == 0 and len(self.launches) > 1 else ""
            lines.append(f"  node {launch.node}{role}: {launch.command(model_dir)}")
        return "\n".join(lines)


def vllm_plan(hardware: str | None, plan: str | None, context: int | None, dtype: str = "stored",
              head: str | None = None) -> EnginePlan:
    """Return the vLLM launches of `plan` (default: vLLM's usual plan) on `hardware` (default: this box).

    Raises PlanError or HardwareSpecError (both ValueError) naming what does not fit together.
    """
    hw = inventory(measure=False) if hardware is None else parse_hardware(hardware)
    chosen = parse_plan(plan, hw.gpus) if plan else default_plan("vllm", hw.gpus, moe=False, latent_kv=False)
    extra = {"head": head} if head else {}
    return EnginePlan(chosen, hw, node_launches(chosen, hw, context, dtype, **extra))


def check_with_vllm(launches: list[NodeLaunch], model_dir: str) -> list[str] | None:
    """Return vLLM's own parser's verdict on each launch ("ok" or its complaint), or None where vLLM is absent."""
    if not engines.installed(settings.VLLM_PYTHON):
        return None
    from .vllm_engine import engine_environment  # here: it loads the tokenizer stack, which planning never needs

    home = Path(settings.APPLIANCE_HOME) / "engines" / "vllm"
    home.mkdir(parents=True, exist_ok=True)
    lists = [[model_dir, *launch.args] for launch in launches]
    result = subprocess.run([settings.VLLM_PYTHON, "-c", PARSE_SCRIPT, json.dumps(lists)], capture_output=True,
                            text=True, cwd=home, env=engine_environment(home), timeout=PARSE_TIMEOUT_S)
    verdicts = result.stdout.strip().splitlines()[-len(lists):]
    if result.returncode != 0 or len(verdicts) != len(lists):
        return [f"vLLM's parser did not run: {result.stderr.strip()[-300:]}"] * len(lists)
    return verdicts
