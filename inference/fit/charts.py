"""Charts of a FitReport for the console: memory breakdown, and expert idleness against batch size."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display on a server; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from .report import FitReport  # noqa: E402
from .roofline import OFFLOAD  # noqa: E402

_COLOURS = {"routed_experts": "#c0504d", "shared_experts": "#f79646", "attention": "#4f81bd", "dense_mlp": "#9bbb59",
            "embedding": "#8064a2", "lm_head": "#4bacc6", "router": "#7f7f7f", "norms": "#bfbfbf", "buffers": "#d9d9d9",
            "other": "#d9d9d9", "KV cache": "#1f497d", "activations + reserve": "#948a54", "headroom": "#ebf1de"}


def _png(fig) -> bytes:
    """Return a figure as PNG bytes and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def render_memory_chart(report: FitReport, concurrency: int | None = None) -> bytes:
    """Return a PNG: device memory split into weights by component, KV at the chosen context, headroom."""
    v = report.verdict
    seqs = max(1, concurrency if concurrency is not None else v["max_concurrent"])
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
    fig, ax = plt.subplots(figsize=(9, 1.6 + 1.2 * len(rows)))
    seen = set()
    for y, (label, parts, capacity) in enumerate(rows):
        used = sum(gb for _, gb in parts)
        if capacity > used:
            parts = parts + [("headroom", capacity - used)]
        left = 0.0
        for name, gb in parts:
            tag = f"{name.replace('_', ' ')} {gb:,.1f} GB"
            ax.barh(y, gb, left=left, color=_COLOURS.get(name, "#cccccc"), edgecolor="white", height=0.6,
                    label=tag if (name, y) not in seen and gb > 0.05 else None)
            seen.add((name, y))
            left += gb
        if capacity:
            ax.plot([capacity, capacity], [y - 0.4, y + 0.4], color="black", linestyle="--", linewidth=1.2)
            note = f"{capacity:,.0f} GB" + (f", over by {used - capacity:,.0f} GB" if used > capacity else "")
            ax.text(capacity, y + 0.33, " " + note, va="bottom", ha="left", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("GB")
    ax.set_title(f"{report.name} on {report.hardware.label}: {v['verdict']}\n{seqs} sequences x {report.context} "
                 f"tokens, weights {report.dtype}", fontsize=10, pad=14)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(rows) == 1 else -0.22), ncol=4, fontsize=8,
              frameon=False)
    return _png(fig)


def render_expert_chart(report: FitReport) -> bytes:
    """Return a PNG: idle-expert fraction and tokens per working expert against sequences per GPU, box vs EP."""
    e = report.experts
    if e is None:
        raise ValueError(f"{report.name} is not a Mixture-of-Experts model; there is no expert chart")
    xs = [r["seqs_per_gpu"] for r in e["rows"]]
    box_label = f"this box ({e['gpus_box']} GPU)" if report.hardware.gpus else "this box (CPU)"
    ep_label = f"expert parallel over {e['gpus_ep']} GPUs"
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(xs, [100 * r["box"]["idle_fraction"] for r in e["rows"]], "o-", color="#c0504d", label=box_label)
    left.plot(xs, [100 * r["ep"]["idle_fraction"] for r in e["rows"]], "s-", color="#4f81bd", label=ep_label)
    left.set_ylabel("experts idle per layer and step (%)")
    right.plot(xs, [r["box"]["tokens_per_working_expert"] for r in e["rows"]], "o-", color="#c0504d", label=box_label)
    right.plot(xs, [r["ep"]["tokens_per_working_expert"] for r in e["rows"]], "s-", color="#4f81bd", label=ep_label)
    target = e["compute_bound_tokens_per_expert"]
    right.axhline(target, color="black", linestyle="--", linewidth=1)
    right.text(xs[0], target * 1.15, f"compute-bound above {target:.0f} tokens/expert", fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("tokens per working expert")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequences decoded per GPU (one token each per step)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.name}: {e['experts']} routed experts, {e['top_k']} per token — {report.hardware.label}",
                 fontsize=10)
    fig.tight_layout()
    return _png(fig)


_ENGINE_MARKERS = {"vllm": "o", "sglang": "s", "builtin": "^", "deepseek": "D"}


def render_throughput_chart(data: dict) -> bytes:
    """Return a PNG: predicted output tokens/s per box against users per box (one box, an EP cluster), with
    the uncertainty band, and the published measurements drawn next to the model's prediction for each."""
    fig, ax = plt.subplots(figsize=(9, 4.6))
    colours = ["#4f81bd", "#c0504d", "#9bbb59"]
    for colour, s in zip(colours, data["series"]):
        if not s["users_per_box"]:
            continue
        ax.plot(s["users_per_box"], s["output_per_box"], "-", color=colour, linewidth=2, label=f"predicted: {s['label']}")
        ax.fill_between(s["users_per_box"], s["low"], s["high"], color=colour, alpha=0.15, linewidth=0)
    for p in data["published"]:
        marker = _ENGINE_MARKERS.get(p["engine"], "x")
        tag = f"{p['engine']} {p['hardware']}" + (f" {p['workload']}" if p.get("workload") else "")
        if p["users_per_box"] is None:  # a published figure without its concurrency: a level, not a point
            ax.axhline(p["measured_per_box"], color="#7f7f7f", linestyle=":", linewidth=1)
            ax.text(1, p["measured_per_box"] * 1.04, f"published, users not stated: {tag}", fontsize=7, color="#555555")
            continue
        filled = "black" if p["role"] == "held_out" else "#f79646"
        ax.scatter([p["users_per_box"]], [p["measured_per_box"]], marker=marker, color=filled, zorder=3, s=28)
        if p["predicted_per_box"]:
            ax.scatter([p["users_per_box"]], [p["predicted_per_box"]], marker=marker, facecolors="none",
                       edgecolors=filled, zorder=3, s=40)
            ax.plot([p["users_per_box"]] * 2, [p["measured_per_box"], p["predicted_per_box"]], color=filled,
                    linewidth=0.8)
        ax.annotate(tag, (p["users_per_box"], p["measured_per_box"]), fontsize=6, xytext=(4, -8),
                    textcoords="offset points", color="#555555")
    # Legend entries for the point styles, drawn once.
    ax.scatter([], [], color="#f79646", marker="o", label="published, fitted on (filled); model's prediction (open)")
    ax.scatter([], [], color="black", marker="o", label="published, held out of the fit")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent users per box (published bursts: prompts sent at once)")
    ax.set_ylabel("output tokens/s per box")
    ax.grid(True, alpha=0.3, which="both")
    ax.set_title(data["title"] + "\npublished points at their own workload (in/out shown)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)
