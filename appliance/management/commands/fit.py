"""`python manage.py fit MODEL`: the fit advisor's verdict for a model directory, config or known name, and with
--workload its predicted throughput, TPOT and TTFT, and the plans that work when the model does not fit."""
import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from inference.fit import ConfigError, HardwareSpecError, analyze, format_text, render_expert_chart, render_memory_chart
from inference.fit.source import KNOWN_CONFIGS


class Command(BaseCommand):
    help = ("Say whether a model fits a box, how many sequences it holds, its token/s bounds and, for MoE models, "
            "how many experts sit idle; with --workload, what it is predicted to deliver (calibrated to published "
            f"measurements). MODEL is a model directory, a config.json or one of: {', '.join(KNOWN_CONFIGS)}.")

    def add_arguments(self, parser):
        parser.add_argument("model")
        parser.add_argument("--hardware", help="planning spec, e.g. 8xH20, 8xH200, 9x8xH100 (nine boxes of eight), "
                                               "4xA100-80G+cpu:1024G, cpu:512G (default: this box's inventory)")
        parser.add_argument("--context", type=int, default=None,
                            help="tokens per sequence (default 4096, or in+out of the workload)")
        parser.add_argument("--dtype", default="stored", help="stored, bf16, fp8, int8 or int4 (default stored)")
        parser.add_argument("--workload", help="in=N,out=M,concurrency=C (or rate=R requests/s; hit=0.5 prefix-cache "
                                               "hits; arrival=burst; spread=exponential): predict throughput for it")
        parser.add_argument("--engine", help="builtin, vllm or sglang (default vllm on GPUs, builtin on a CPU box)")
        parser.add_argument("--plan", help="parallel plan: tp8, tp8-dpattn, dp8-ep8, ep16, ep72, dp4-tp2, tp8-offload "
                                           "(default: the engine's usual plan)")
        parser.add_argument("--engine-flags", action="store_true",
                            help="print the plan (--plan, --hardware, --context, --dtype) as the command line of "
                                 "--engine (vllm, the default, or sglang), one per node over several boxes, checked "
                                 "with that engine's own parser where it is installed")
        parser.add_argument("--head-address", help="with --engine-flags over several boxes: the head node's address")
        parser.add_argument("--json", action="store_true", help="print the full report as JSON")
        parser.add_argument("--charts", type=Path, metavar="DIR", help="also write the memory and expert charts here "
                                                                       "(and the throughput chart with --workload)")

    def handle(self, model, hardware, context, dtype, workload, engine, plan, json: bool, charts, engine_flags,
               head_address, **options):
        from inference.fit import advice  # here: torch and transformers load only when the command runs

        if engine_flags:
            return self.print_engine_flags(engine or "vllm", model, hardware, plan, context, dtype, head_address)
        if context is not None and context < 1:
            raise CommandError("--context must be at least 1")
        try:
            load = advice.parse_request(workload, engine, plan) if (workload or engine or plan) else None
            if load is not None and load.workload is None:
                raise CommandError("--engine and --plan predict throughput: give --workload in=N,out=M,concurrency=C too")
            if context is None:
                context = load.workload.context if load else 4096
            report = analyze(model, hardware, context, dtype)
            predicted = advice.advise(report, load) if load else None
        except (ConfigError, HardwareSpecError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        if json:
            data = report.to_dict()
            if predicted:
                data.update(predicted)
            self.stdout.write(_dumps(data))
        else:
            self.stdout.write(format_text(report))
            if predicted:
                self.stdout.write(advice.format_prediction(predicted))
        if charts:
            charts.mkdir(parents=True, exist_ok=True)
            (charts / f"{report.name}-memory.svg").write_text(render_memory_chart(report))
            if report.experts:
                (charts / f"{report.name}-experts.svg").write_text(render_expert_chart(report))
            if predicted:
                (charts / f"{report.name}-throughput.svg").write_text(advice.throughput_chart(report, load))
            self.stderr.write(f"charts written to {charts}")


    def print_engine_flags(self, engine, model, hardware, plan, context, dtype, head_address) -> None:
        # Here: it loads torch, for --engine-flags only.
        from appliance.engine_plan import check_flags, launch_plan
        from inference.fit.engine_flags import ENGINE_NAMES

        if engine not in ENGINE_NAMES:
            raise CommandError(f"--engine-flags plans for vllm or sglang, not {engine!r}")
        name = ENGINE_NAMES[engine]
        try:
            planned = launch_plan(engine, hardware, plan, context, dtype, head_address)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(planned.describe(model))
        verdicts = check_flags(engine, planned.launches, model)
        if verdicts is None:
            self.stdout.write(f"not checked with {name}'s parser: {name} is not installed here "
                              f"(APPLIANCE_{engine.upper()}_PYTHON)")
            return
        refused = [f"node {launch.node}: {verdict}" for launch, verdict in zip(planned.launches, verdicts)
                   if verdict != "ok"]
        if refused:
            raise CommandError(f"{name}'s own parser refuses: " + "; ".join(refused))
        self.stdout.write(f"{name}'s own parser accepts every command line")


def _dumps(data) -> str:
    """Return indented JSON."""
    return json.dumps(data, indent=2, default=str)
