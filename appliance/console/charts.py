"""The console's charts: drawn by the box's one chart module (the charts package), marked safe here for templates.
Safe because the canvas escapes every text it writes, the model's name and the labels included."""
from functools import partial

from django.utils.safestring import SafeString, mark_safe

import charts

WIDTH, HEIGHT = 560, 170


def chart(title: str, labels: list[str], series: dict[str, list[float | None]], *, kind: str = "bar",
          unit: str = "") -> SafeString:
    """Return an SVG chart of one or more series over labels (bars side by side, or lines)."""
    draw = partial(charts.columns, title=title, labels=labels, series=series, kind=kind, unit=unit)
    return mark_safe(charts.panels(WIDTH, HEIGHT, title, [draw], css_class="chart"))


def usage_charts(buckets, label_format: str) -> list[SafeString]:
    """Return the four standard charts (requests, tokens, latency, errors) of a usage series."""
    labels = [b.start.strftime(label_format) for b in buckets]
    return [
        chart("Requests", labels, {"requests": [b.requests for b in buckets]}),
        chart("Tokens", labels, {"prompt": [b.prompt_tokens for b in buckets],
                                 "completion": [b.completion_tokens for b in buckets]}),
        chart("Latency (successful requests)", labels, {"p50": [b.latency_p50_ms for b in buckets],
                                                        "p95": [b.latency_p95_ms for b in buckets]},
              kind="line", unit=" ms"),
        chart("Errors and refusals", labels, {"failed": [b.failed for b in buckets],
                                              "refused": [b.refused for b in buckets]}),
    ]


def expert_heatmap(snap: dict) -> SafeString:
    """Return an SVG of an engine's MoE telemetry (inference.engine.telemetry.snapshot): tokens per expert per
    layer as a heat map, and the idle fraction of recent steps."""
    model = snap.get("model", "")
    if not snap.get("moe"):
        return mark_safe(charts.message(f"{model}: not a mixture-of-experts model"))
    idle = snap.get("idle_fraction")
    mean = "n/a" if idle is None else f"{100 * idle:.0f}%"
    rows = [(f"layer {layer['layer']}", layer["expert_tokens"]) for layer in snap["layers"]]
    spark = [r["idle_fraction"] for r in snap["recent"]]
    return mark_safe(charts.heatmap(f"{model}: tokens per expert", rows, spark, column="expert", unit="tokens",
                                    spark_label=f"idle experts per step, last {len(spark)} steps (mean {mean})"))
