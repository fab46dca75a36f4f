"""The one chart module (the charts package): well-formed SVG with every outside text escaped and nothing fetched,
and the same chart drawn as a reportlab Drawing for the PDF."""
from functools import partial
from xml.etree import ElementTree

import charts
from charts.drawing import DrawingCanvas

HOSTILE = '<script>alert(1)</script>"&\''


def every_kind(canvas):
    """Return one figure of each kind, a hostile label in every text slot."""
    cols = partial(charts.columns, title=HOSTILE, labels=[HOSTILE, "b"], series={HOSTILE: [1, 2], "q": [3, None]})
    stacked = partial(charts.columns, title="s", labels=["a"], series={HOSTILE: [1], "q": [2]}, stacked=True)
    lines = partial(charts.columns, title="l", labels=["a", "b"], series={"p": [1, None]}, kind="line", unit=HOSTILE)
    bars = partial(charts.hbars, title=HOSTILE, colours={"k": "#123456"},
                   rows=[(HOSTILE, [("k", 3.0, HOSTILE), ("other", 1.0, None)], 8.0, HOSTILE)], unit=" GB")
    plot = partial(charts.xy, title=HOSTILE, xlog=True, ylog=True, xlabel=HOSTILE, ylabel=HOSTILE,
                   lines=[{"label": HOSTILE, "xs": [1, 2, 4], "ys": [10, 20, 0], "low": [9, 18, 0],
                           "high": [11, 22, 0], "colour": "#4f81bd", "marker": "o"}],
                   hlines=[{"y": 15, "colour": "#000000", "text": HOSTILE}],
                   marks=[{"x": 2, "y": 30, "to": 25, "shape": s, "colour": "#f79646", "text": HOSTILE}
                          for s in ("o", "s", "^", "D", "x")],
                   legend=[(HOSTILE, "#000000", "o")])
    return [charts.panels(900, 300, HOSTILE, [cols, stacked, lines, bars, plot], canvas=canvas, heading=HOSTILE),
            charts.heatmap(HOSTILE, [(HOSTILE, [0, 3, 1])], [0.5, 0.25], HOSTILE, column="expert", unit="tokens",
                           canvas=canvas),
            charts.message(HOSTILE, canvas=canvas)]


def test_svg_is_well_formed_escapes_outside_text_and_fetches_nothing():
    for svg in every_kind(charts.SvgCanvas):
        root = ElementTree.fromstring(svg)  # raises on markup a label broke
        assert not [e for e in root.iter() if e.tag.endswith("script")]
        assert "<script" not in svg and "href" not in svg and "http://" not in svg.replace(
            "http://www.w3.org/2000/svg", "")
        assert HOSTILE in "".join(root.itertext())  # the text is kept, as text


def test_the_same_charts_draw_as_reportlab_drawings():
    from reportlab.graphics import renderPDF
    from reportlab.graphics.shapes import Drawing

    for drawing in every_kind(DrawingCanvas):
        assert isinstance(drawing, Drawing)
        assert renderPDF.drawToString(drawing).startswith(b"%PDF")


def test_round_axis_maxima():
    assert [charts.plots.nice_max(v) for v in (0, 1, 3, 7, 120, 2600)] == [1, 1, 5, 10, 200, 5000]
