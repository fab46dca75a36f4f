"""Small server-rendered SVG charts: no JavaScript and no asset from the internet."""
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

WIDTH, HEIGHT = 560, 170
PAD_L, PAD_R, PAD_T, PAD_B = 52, 10, 24, 26
COLOURS = ("#268bd2", "#dc322f", "#859900", "#b58900")


def _nice_max(value: float) -> float:
    """Return a round axis maximum at or above value."""
    if value <= 0:
        return 1
    magnitude = 10 ** (len(str(int(value))) - 1)
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def _fmt(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:g}{unit}"
    return f"{value:g}"


def chart(title: str, labels: list[str], series: dict[str, list[float | None]], *, kind: str = "bar",
          unit: str = "") -> SafeString:
    """Return an SVG chart of one or more series over labels (bars side by side, or lines)."""
    values = [v for vs in series.values() for v in vs if v is not None]
    top = _nice_max(max(values, default=0))
    n = max(1, len(labels))
    plot_w, plot_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B
    slot = plot_w / n

    def y(v: float) -> float:
        return PAD_T + plot_h - (v / top) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'width="{WIDTH}" height="{HEIGHT}" aria-label="{escape(title)}">',
             f'<text x="{PAD_L}" y="14" font-size="12" font-weight="bold">{escape(title)}</text>']
    for frac in (0, 0.5, 1):
        gy = y(top * frac)
        parts.append(f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{gy:.1f}" y2="{gy:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{PAD_L - 4}" y="{gy + 4:.1f}" font-size="10" text-anchor="end">'
                     f'{escape(_fmt(top * frac))}{escape(unit)}</text>')
    every = max(1, n // 8)
    for i, label in enumerate(labels):
        if i % every == 0:
            parts.append(f'<text x="{PAD_L + slot * (i + 0.5):.1f}" y="{HEIGHT - 8}" font-size="10" '
                         f'text-anchor="middle">{escape(label)}</text>')
    names = list(series)
    for s, name in enumerate(names):
        colour = COLOURS[s % len(COLOURS)]
        vs = series[name]
        if kind == "bar":
            bar_w = max(1.0, slot * 0.8 / len(names))
            for i, v in enumerate(vs):
                if v:
                    x = PAD_L + slot * i + slot * 0.1 + bar_w * s
                    parts.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{bar_w:.1f}" '
                                 f'height="{PAD_T + plot_h - y(v):.1f}" fill="{colour}">'
                                 f'<title>{escape(labels[i])}: {escape(_fmt(v))}{escape(unit)}</title></rect>')
        else:
            points = " ".join(f"{PAD_L + slot * (i + 0.5):.1f},{y(v):.1f}" for i, v in enumerate(vs) if v is not None)
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
            for i, v in enumerate(vs):
                if v is not None:
                    parts.append(f'<circle cx="{PAD_L + slot * (i + 0.5):.1f}" cy="{y(v):.1f}" r="2.5" '
                                 f'fill="{colour}"><title>{escape(labels[i])}: {escape(_fmt(v))}{escape(unit)}'
                                 f'</title></circle>')
        if len(names) > 1:
            lx = WIDTH - PAD_R - 90 * (len(names) - s)
            parts.append(f'<rect x="{lx}" y="5" width="10" height="10" fill="{colour}"/>'
                         f'<text x="{lx + 14}" y="14" font-size="11">{escape(name)}</text>')
    parts.append("</svg>")
    return mark_safe("".join(parts))  # every interpolated text above is escaped


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


def expert_heatmap(snap: dict, *, cell: int = 14) -> SafeString:
    """Return an SVG of an engine's MoE telemetry (inference.engine.telemetry.snapshot): tokens per expert per
    layer as a heat map, and the idle fraction of recent steps."""
    title = escape(f"{snap.get('model', '')}: tokens per expert")
    if not snap.get("moe"):
        return mark_safe(f'<svg xmlns="http://www.w3.org/2000/svg" width="360" height="40" role="img">'
                f'<text x="4" y="24" font-family="sans-serif" font-size="13">{escape(snap.get("model", ""))}: '
                f"not a mixture-of-experts model</text></svg>")  # the model's name is escaped
    layers, experts = snap["layers"], snap["num_experts"]
    left, top = 70, 34
    width = left + experts * cell + 20
    spark_top = top + len(layers) * cell + 30
    height = spark_top + 80
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'font-family="sans-serif" font-size="11"><title>{title}</title>',
           f'<text x="4" y="16" font-size="13">{title} (darker = more tokens)</text>']
    for row, layer in enumerate(layers):
        counts = layer["expert_tokens"]
        peak = max(counts) or 1
        y = top + row * cell
        out.append(f'<text x="4" y="{y + cell - 3}">layer {layer["layer"]}</text>')
        for e, n in enumerate(counts):
            shade = 255 - int(215 * n / peak)
            out.append(f'<rect x="{left + e * cell}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                       f'fill="rgb({shade},{shade},255)"><title>layer {layer["layer"]}, expert {e}: {n} tokens'
                       f"</title></rect>")
    idle = snap.get("idle_fraction")
    label = "n/a" if idle is None else f"{100 * idle:.0f}%"
    out.append(f'<text x="4" y="{spark_top - 8}">idle experts per step, last {len(snap["recent"])} steps '
               f"(mean {label})</text>")
    recent = [r["idle_fraction"] for r in snap["recent"]]
    if recent:
        step = (width - left - 20) / max(1, len(recent) - 1)
        points = " ".join(f"{left + i * step:.1f},{spark_top + 60 - 60 * v:.1f}" for i, v in enumerate(recent))
        out.append(f'<polyline fill="none" stroke="#c33" stroke-width="1.5" points="{points}"/>')
    out.append(f'<text x="4" y="{spark_top + 10}">100%</text><text x="4" y="{spark_top + 64}">0%</text>')
    out.append("</svg>")
    return mark_safe("".join(out))  # the only text from outside, the model's name, is escaped
