"""The kinds of chart the box draws, each once: columns over labels (bars or lines), stacked horizontal bars
against a capacity, lines over numeric (log) axes with bands and marks, and a heat map. Each draws on a canvas
inside a box (x, y, width, height), so one figure can hold several panels in either backend."""
import math

from .canvas import SvgCanvas

COLOURS = ("#268bd2", "#dc322f", "#859900", "#b58900", "#6c71c4", "#2aa198", "#d33682", "#cb4b16")
GRID = "#dddddd"
NOTE = "#555555"


def nice_max(value: float) -> float:
    """Return a round axis maximum at or above value."""
    if value <= 0:
        return 1
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def fmt(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:g}{unit}"
    return f"{value:g}"


def panels(width: float, height: float, title: str, draws, *, canvas=SvgCanvas, css_class: str = "",
           heading: str = "", weights=None):
    """Return one figure: each draw(c, box) in its own panel, side by side, under an optional heading."""
    c = canvas(width, height, title, css_class)
    top = 0
    for line in heading.splitlines():
        top += 15
        c.text(width / 2, top, line, size=12 if top == 15 else 10, anchor="middle", bold=top == 15)
    weights = weights or [1] * len(draws)
    x = 0.0
    for draw, weight in zip(draws, weights):
        w = width * weight / sum(weights)
        draw(c, (x, top, w, height - top))
        x += w
    return c.finish()


def columns(c, box, title: str, labels: list[str], series: dict[str, list[float | None]], *, kind: str = "bar",
            unit: str = "", stacked: bool = False):
    """Draw one or more series over labels: bars side by side or stacked, or lines with points."""
    bx, by, bw, bh = box
    left, right, top, bottom = bx + 52, bx + bw - 10, by + 24, by + bh - 26
    names = list(series)
    n = max(1, len(labels))
    if stacked:
        values = [sum(vs[i] or 0 for vs in series.values()) for i in range(len(labels))]
    else:
        values = [v for vs in series.values() for v in vs if v is not None]
    peak = nice_max(max(values, default=0))
    slot = (right - left) / n

    def y(v: float) -> float:
        return bottom - (v / peak) * (bottom - top)

    c.text(left, by + 14, title, size=12, bold=True)
    for frac in (0, 0.5, 1):
        c.line(left, y(peak * frac), right, y(peak * frac), GRID)
        c.text(left - 4, y(peak * frac) + 4, f"{fmt(peak * frac)}{unit}", anchor="end")
    every = max(1, n // 8)
    for i, label in enumerate(labels):
        if i % every == 0:
            c.text(left + slot * (i + 0.5), by + bh - 8, label, anchor="middle")
    base = [0.0] * len(labels)
    for s, name in enumerate(names):
        colour = COLOURS[s % len(COLOURS)]
        vs = series[name]
        if kind == "bar":
            bar_w = slot * 0.8 if stacked else max(1.0, slot * 0.8 / len(names))
            for i, v in enumerate(vs):
                if v:
                    x = left + slot * i + slot * 0.1 + (0 if stacked else bar_w * s)
                    tip = f"{labels[i]}: {fmt(v)}{unit}" + (f" ({name})" if stacked else "")
                    c.rect(x, y(base[i] + v), bar_w, y(base[i]) - y(base[i] + v), colour, tip=tip)
                    base[i] += v if stacked else 0
        else:
            points = [(i, left + slot * (i + 0.5), y(v), v) for i, v in enumerate(vs) if v is not None]
            c.polyline([(px, py) for _, px, py, _ in points], colour, width=2)
            for i, px, py, v in points:
                c.circle(px, py, 2.5, colour, tip=f"{labels[i]}: {fmt(v)}{unit}")
        if len(names) > 1:  # 90 px per entry, more for a long name (a team's)
            lx = right - sum(max(90, 24 + 6 * len(n)) for n in names[s:])
            c.rect(lx, by + 5, 10, 10, colour)
            c.text(lx + 14, by + 14, name, size=11)


def hbars(c, box, title: str, rows, *, colours: dict, unit: str = ""):
    """Draw stacked horizontal bars, one per row (label, [(key, value, legend text or None)], capacity or None,
    note); a capacity is a dashed mark, the note is written after it (or after the bar)."""
    bx, by, bw, bh = box
    legend = [(tag, colours.get(key, GRID)) for _, parts, _, _ in rows for key, _, tag in parts if tag]
    per_row = 4
    legend_h = 14 * math.ceil(len(legend) / per_row)
    label_w = min(bw * 0.35, 12 + 6 * max((len(r[0]) for r in rows), default=0))
    left, right = bx + label_w, bx + bw - 60
    top, bottom = by + 24, by + bh - 22 - legend_h
    # Round ticks, but an axis no longer than the longest bar needs: capacities are often just past a power of 10.
    longest = max((max(sum(p[1] for p in parts), cap or 0) for _, parts, cap, _ in rows), default=0) or 1
    step = nice_max(longest / 5)
    peak = step * math.ceil(longest / step)
    row_h = (bottom - top) / max(1, len(rows))

    def x(v: float) -> float:
        return left + v / peak * (right - left)

    if title:
        c.text(bx + 4, by + 14, title, size=12, bold=True)
    for k in range(round(peak / step) + 1):
        c.line(x(step * k), top, x(step * k), bottom, GRID)
        c.text(x(step * k), bottom + 12, f"{fmt(step * k)}{unit}", size=9, anchor="middle")
    for i, (label, parts, capacity, note) in enumerate(rows):
        mid, h = top + row_h * (i + 0.5), min(28.0, row_h * 0.6)
        c.text(left - 4, mid + 4, label, anchor="end")
        used = 0.0
        for key, value, tag in parts:
            c.rect(x(used), mid - h / 2, x(used + value) - x(used), h, colours.get(key, GRID), stroke="#ffffff",
                   tip=tag or f"{label}: {fmt(value)}{unit}")
            used += value
        if capacity:
            c.line(x(capacity), mid - h / 2 - 4, x(capacity), mid + h / 2 + 4, "#000000", width=1.2, dash=True)
        if note:
            c.text(x(capacity or used) + 3, mid - h / 2 - 5 if capacity else mid + 4, note, size=8)
    for k, (tag, colour) in enumerate(legend):
        lx, ly = bx + 8 + (bw - 16) / per_row * (k % per_row), bottom + 24 + 14 * (k // per_row)
        c.rect(lx, ly - 9, 10, 10, colour)
        c.text(lx + 14, ly, tag, size=8)


def _axis(values, log: bool, base: int):
    """Return (fraction of the axis for a value, ticks) over values, from 0 (linear) or whole powers (log)."""
    if log:
        vals = [v for v in values if v is not None and v > 0] or [1.0]
        lo = base ** math.floor(math.log(min(vals), base) + 1e-9)
        hi = max(lo * base, base ** math.ceil(math.log(max(vals), base) - 1e-9))
        ticks = [lo * base ** k for k in range(round(math.log(hi / lo, base)) + 1)]
        ticks = ticks[::math.ceil(len(ticks) / 8)]
        return (lambda v: math.log(v / lo) / math.log(hi / lo)), ticks
    hi = nice_max(max((v for v in values if v is not None), default=0))
    return (lambda v: v / hi), [0, hi / 2, hi]


def _mark(c, x, y, shape: str, colour: str, filled: bool = True, r: float = 3.5):
    """Draw a point: o circle, s square, ^ triangle, D diamond, anything else a cross."""
    fill, stroke = (colour, None) if filled else (None, colour)
    if shape == "o":
        c.circle(x, y, r, fill, stroke=stroke)
    elif shape == "s":
        c.rect(x - r, y - r, 2 * r, 2 * r, fill or "none", stroke=stroke)
    elif shape in ("^", "D"):
        corners = [(x, y - r), (x + r, y + r), (x - r, y + r)] if shape == "^" else [
            (x, y - r), (x + r, y), (x, y + r), (x - r, y)]
        c.polygon(corners, fill, stroke=stroke)
    else:
        c.line(x - r, y - r, x + r, y + r, colour)
        c.line(x - r, y + r, x + r, y - r, colour)


def xy(c, box, title: str, lines, *, xlog: bool = False, ylog: bool = False, xlabel: str = "", ylabel: str = "",
       hlines=(), marks=(), legend=()):
    """Draw lines over numeric axes (log base 2 for x, 10 for y when asked).

    lines: {label, xs, ys, colour, marker, low, high}; hlines: {y, colour, dash, text}; marks: {x, y, shape,
    colour, filled, text, to} (to: a second y, drawn open and joined to the first); legend: extra (text, colour,
    shape) entries."""
    bx, by, bw, bh = box
    left, right, top, bottom = bx + 52, bx + bw - 12, by + 36, by + bh - 32
    xs = [x for line in lines for x in line["xs"]] + [m["x"] for m in marks]
    ys = [y for line in lines for key in ("ys", "low", "high") for y in line.get(key) or ()]
    ys += [h["y"] for h in hlines] + [y for m in marks for y in (m["y"], m.get("to"))]
    fx, xticks = _axis(xs, xlog, 2)
    fy, yticks = _axis(ys, ylog, 10)

    def at(x, y):
        return left + fx(x) * (right - left), bottom - fy(y) * (bottom - top)

    def shown(x, y):
        return y is not None and (x > 0 or not xlog) and (y > 0 or not ylog)

    c.text(bx + 4, by + 14, title, size=11, bold=True)
    c.text(bx + 4, by + 28, ylabel, size=9, colour=NOTE)
    for t in yticks:
        c.line(left, at(xticks[0], t)[1], right, at(xticks[0], t)[1], GRID)
        c.text(left - 4, at(xticks[0], t)[1] + 3, fmt(t), size=9, anchor="end")
    for t in xticks:
        c.line(at(t, yticks[0])[0], top, at(t, yticks[0])[0], bottom, GRID)
        c.text(at(t, yticks[0])[0], bottom + 12, f"{t:g}" if xlog else fmt(t), size=9, anchor="middle")
    c.text((left + right) / 2, bottom + 26, xlabel, size=9, anchor="middle", colour=NOTE)
    for line in lines:
        if line.get("low") and line.get("high"):
            band = [at(x, y) for x, y in zip(line["xs"], line["high"]) if shown(x, y)]
            band += [at(x, y) for x, y in reversed(list(zip(line["xs"], line["low"]))) if shown(x, y)]
            c.polygon(band, line["colour"], opacity=0.15)
        c.polyline([at(x, y) for x, y in zip(line["xs"], line["ys"]) if shown(x, y)], line["colour"], width=2)
        for x, y in zip(line["xs"], line["ys"]):
            if line.get("marker") and shown(x, y):
                _mark(c, *at(x, y), line["marker"], line["colour"])
    for h in hlines:
        c.line(left, at(xticks[0], h["y"])[1], right, at(xticks[0], h["y"])[1], h["colour"], dash=h.get("dash", True))
        c.text(left + 4, at(xticks[0], h["y"])[1] - 4, h.get("text", ""), size=8, colour=NOTE)
    for m in marks:
        if m.get("to") and shown(m["x"], m["to"]):
            c.line(*at(m["x"], m["y"]), *at(m["x"], m["to"]), m["colour"], width=0.8)
            _mark(c, *at(m["x"], m["to"]), m["shape"], m["colour"], filled=False, r=4.5)
        _mark(c, *at(m["x"], m["y"]), m["shape"], m["colour"], m.get("filled", True))
        if m.get("text"):  # on the side with room: the plot's right half writes leftwards
            px, py = at(m["x"], m["y"])
            east = px < (left + right) / 2
            c.text(px + (5 if east else -5), py + 9, m["text"], size=6, anchor="start" if east else "end", colour=NOTE)
    entries = [(line["label"], line["colour"], line.get("marker")) for line in lines] + list(legend)
    for k, (text, colour, shape) in enumerate(entries):
        ly = top + 10 + 12 * k
        if shape:
            _mark(c, right - 8, ly - 3, shape, colour)
        else:
            c.line(right - 14, ly - 3, right - 2, ly - 3, colour, width=2)
        c.text(right - 18, ly, text, size=8, anchor="end")


def heatmap(title: str, rows, spark: list[float], spark_label: str, *, column: str, unit: str, cell: int = 14,
            canvas=SvgCanvas):
    """Return a heat map (rows of (label, counts), darker = more, each row against its own peak) above a
    sparkline of fractions (0 to 1)."""
    left, top = 70, 34
    columns_n = max((len(counts) for _, counts in rows), default=0)
    width = left + columns_n * cell + 20
    spark_top = top + len(rows) * cell + 30
    c = canvas(width, spark_top + 80, title)
    c.text(4, 16, f"{title} (darker = more {unit})", size=13)
    for r, (label, counts) in enumerate(rows):
        peak = max(counts, default=0) or 1
        y = top + r * cell
        c.text(4, y + cell - 3, label, size=11)
        for e, n in enumerate(counts):
            shade = 255 - int(215 * n / peak)
            c.rect(left + e * cell, y, cell - 1, cell - 1, f"#{shade:02x}{shade:02x}ff",
                   tip=f"{label}, {column} {e}: {n} {unit}")
    c.text(4, spark_top - 8, spark_label, size=11)
    if spark:
        step = (width - left - 20) / max(1, len(spark) - 1)
        c.polyline([(left + i * step, spark_top + 60 - 60 * v) for i, v in enumerate(spark)], "#cc3333")
    c.text(4, spark_top + 10, "100%", size=11)
    c.text(4, spark_top + 64, "0%", size=11)
    return c.finish()


def message(text: str, *, width: int = 360, canvas=SvgCanvas):
    """Return a one-line figure: a chart that has nothing to draw says why."""
    c = canvas(width, 40, text)
    c.text(4, 24, text, size=13)
    return c.finish()
