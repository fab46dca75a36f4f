"""`python manage.py fit MODEL`: the fit advisor's verdict for a model directory, config or known name."""
import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from inference.fit import ConfigError, HardwareSpecError, analyze, format_text, render_expert_chart, render_memory_chart
from inference.fit.source import KNOWN_CONFIGS


class Command(BaseCommand):
    help = ("Say whether a model fits a box, how many sequences it holds, its token/s bounds and, for MoE models, "
            f"how many experts sit idle. MODEL is a model directory, a config.json or one of: {', '.join(KNOWN_CONFIGS)}.")

    def add_arguments(self, parser):
        parser.add_argument("model")
        parser.add_argument("--hardware", help="planning spec, e.g. 8xH20, 8xH200, 4xA100-80G+cpu:1024G, cpu:512G "
                                               "(default: this box's inventory)")
        parser.add_argument("--context", type=int, default=4096, help="tokens per sequence (default 4096)")
        parser.add_argument("--dtype", default="stored", help="stored, bf16, fp8, int8 or int4 (default stored)")
        parser.add_argument("--json", action="store_true", help="print the full report as JSON")
        parser.add_argument("--charts", type=Path, metavar="DIR", help="also write the memory and expert charts here")

    def handle(self, model, hardware, context, dtype, json: bool, charts, **options):
        if context < 1:
            raise CommandError("--context must be at least 1")
        try:
            report = analyze(model, hardware, context, dtype)
        except (ConfigError, HardwareSpecError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        if json:
            self.stdout.write(_dumps(report.to_dict()))
        else:
            self.stdout.write(format_text(report))
        if charts:
            charts.mkdir(parents=True, exist_ok=True)
            (charts / f"{report.name}-memory.png").write_bytes(render_memory_chart(report))
            if report.experts:
                (charts / f"{report.name}-experts.png").write_bytes(render_expert_chart(report))
            self.stderr.write(f"charts written to {charts}")


def _dumps(data) -> str:
    """Return indented JSON."""
    return json.dumps(data, indent=2, default=str)
