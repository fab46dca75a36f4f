"""Charts of a FitReport: memory breakdown, expert idleness against batch size, throughput against users.

The figures are computed here; the charts package draws them (SVG text, no markup written in this module)."""

from __future__ import annotations

from functools import partial

import charts

from .report import FitReport
from .roofline import OFFLOAD

_COLOURS = {"routed_experts": "#c0504d", "shared_experts": "#f79646", "attention": "#4f81bd", "dense_mlp": "#9bbb59",
            "embedding": "#8064a2", "lm_head": "#4bacc6", "router": "#7f7f7f", "norms": "#bfbfbf", "buffers": "#d9d9d9",
            "other": "#d9d9d9", "KV cache": "#1f497d", "activations + reserve": "#948a54", "headroom": "#ebf1de"}
_BOX, _EP = "#c0504d", "#4f81bd"


def memory_rows(report: FitReport, seqs: int) -> list[tuple]:
    """Return the memory chart's rows: (device, [(component, GB, legend text)], capacity GB, note)."""
    v = report.verdict
    kv_gb = seqs * report.context * report.kv_bytes_per_token["engine"] / 1e9
    act = report.activation
    act_gb = (act.prefill_bytes + act.decode_bytes(seqs, report.context)) / 1e9 + report.reserve_gb
    weights = dict(report.weights_by_component_gb)
    host_parts = []
    if v["verdict"] == OFFLOAD:  # the routed experts live in host RAM, the rest on the GPUs
        host_parts = [("routed_experts", weights.pop("routed_experts"))]
    device_parts = sorted(weights.items(), key=lambda kv: -kv[1]) + [("KV cache", kv_gb), ("activations + reserve", act_gb)]
    rows = [("GPU memory" if report.hardware.gpus else "host RAM", device_parts, report.hardware.device_memory_gb)]
    if host_parts:
        rows.append(("host RAM", host_parts, report.hardware.host_ram_gb or 0.0))
    out = []
    for label, parts, capacity in rows:
        used = sum(gb for _, gb in parts)
        if capacity > used:
            parts = parts + [("headroom", capacity - used)]
        note = f"{capacity:,.0f} GB" + (f", over by {used - capacity:,.0f} GB" if used > capacity else "") if capacity else ""
        out.append((label, [(name, gb, f"{name.replace('_', ' ')} {gb:,.1f} GB" if gb > 0.05 else None)
                            for name, gb in parts], capacity, note))
    return out


def render_memory_chart(report: FitReport, concurrency: int | None = None) -> str:
    """Return an SVG: device memory split into weights by component, KV at the chosen context, headroom."""
    v = report.verdict
    seqs = max(1, concurrency if concurrency is not None else v["max_concurrent"])
    rows = memory_rows(report, seqs)
    legend_lines = -(-sum(1 for r in rows for p in r[1] if p[2]) // 4)
    title = f"{report.name} on {report.hardware.label}: {v['verdict']}"
    heading = f"{title}\n{seqs} sequences x {report.context} tokens, weights {report.dtype}"
    draw = partial(charts.hbars, title="", rows=rows, colours=_COLOURS, unit=" GB")
    return charts.panels(900, 90 + 60 * len(rows) + 14 * legend_lines, title, [draw], heading=heading)


def render_expert_chart(report: FitReport) -> str:
    """Return an SVG: idle-expert fraction and tokens per working expert against sequences per GPU, box vs EP."""
    e = report.experts
    if e is None:
        raise ValueError(f"{report.name} is not a Mixture-of-Experts model; there is no expert chart")
    xs = [r["seqs_per_gpu"] for r in e["rows"]]
    box_label = f"this box ({e['gpus_box']} GPU)" if report.hardware.gpus else "this box (CPU)"
    ep_label = f"expert parallel over {e['gpus_ep']} GPUs"

    def lines(figure, scale=1):
        return [{"label": box_label, "xs": xs, "ys": [scale * r["box"][figure] for r in e["rows"]], "colour": _BOX,
                 "marker": "o"},
                {"label": ep_label, "xs": xs, "ys": [scale * r["ep"][figure] for r in e["rows"]], "colour": _EP,
                 "marker": "s"}]

    xlabel = "sequences decoded per GPU (one token each per step)"
    target = e["compute_bound_tokens_per_expert"]
    idle = partial(charts.xy, title="Idle experts", lines=lines("idle_fraction", 100), xlog=True, xlabel=xlabel,
                   ylabel="experts idle per layer and step (%)")
    work = partial(charts.xy, title="Tokens per working expert", lines=lines("tokens_per_working_expert"),
                   xlog=True, ylog=True, xlabel=xlabel, ylabel="tokens per working expert",
                   hlines=[{"y": target, "colour": "#000000",
                            "text": f"compute-bound above {target:.0f} tokens/expert"}])
    title = f"{report.name}: {e['experts']} routed experts, {e['top_k']} per token — {report.hardware.label}"
    return charts.panels(1000, 400, title, [idle, work], heading=title)


_ENGINE_MARKERS = {"vllm": "o", "sglang": "s", "builtin": "^", "deepseek": "D"}


def render_throughput_chart(data: dict) -> str:
    """Return an SVG: predicted output tokens/s per box against users per box (one box, an EP cluster), with
    the uncertainty band, and the published measurements drawn next to the model's prediction for each."""
    colours = ["#4f81bd", "#c0504d", "#9bbb59"]
    lines = [{"label": f"predicted: {s['label']}", "xs": s["users_per_box"], "ys": s["output_per_box"],
              "low": s["low"], "high": s["high"], "colour": colour}
             for colour, s in zip(colours, data["series"]) if s["users_per_box"]]
    hlines, marks = [], []
    for p in data["published"]:
        tag = f"{p['engine']} {p['hardware']}" + (f" {p['workload']}" if p.get("workload") else "")
        if p["users_per_box"] is None:  # a published figure without its concurrency: a level, not a point
            hlines.append({"y": p["measured_per_box"], "colour": "#7f7f7f", "text": f"published, users not stated: {tag}"})
            continue
        marks.append({"x": p["users_per_box"], "y": p["measured_per_box"], "to": p["predicted_per_box"], "text": tag,
                      "shape": _ENGINE_MARKERS.get(p["engine"], "x"),
                      "colour": "#000000" if p["role"] == "held_out" else "#f79646"})
    legend = [("published, fitted on (filled); model's prediction (open)", "#f79646", "o"),
              ("published, held out of the fit", "#000000", "o")]
    draw = partial(charts.xy, title="", lines=lines, xlog=True, ylog=True, hlines=hlines, marks=marks, legend=legend,
                   xlabel="concurrent users per box (published bursts: prompts sent at once)",
                   ylabel="output tokens/s per box")
    return charts.panels(900, 480, data["title"], [draw],
                         heading=data["title"] + "\npublished points at their own workload (in/out shown)")
