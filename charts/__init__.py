"""The box's one chart module: every chart (console, fit advisor, auditor's report) is drawn here from plain
numbers, so each kind of chart has one home and the code that computes figures never writes markup.

Charts draw on a small canvas with two backends: SVG text (canvas.py), for the console, the fit advisor's files
and the auditor's HTML report, and a reportlab Drawing (drawing.py, imported by the PDF's renderer alone), so the
auditor's PDF embeds the same chart as vectors without a second plotting library. Nothing here is fetched from
elsewhere (no fonts, CSS or scripts: the box is air-gapped), and every text that reaches SVG is escaped by the
canvas, in one place.

A package of its own, beside appliance, inference and audit, because all three draw and audit imports neither of
the others. It imports none of them, nor Django (tests/charts/test_charts.py): the console marks the SVG safe in
appliance/console/charts.py.
"""
from .canvas import SvgCanvas
from .plots import columns, hbars, heatmap, message, panels, xy

__all__ = ["SvgCanvas", "columns", "hbars", "heatmap", "message", "panels", "xy"]
