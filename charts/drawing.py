"""The charts' canvas as a reportlab Drawing (a platypus flowable), so that the auditor's PDF embeds the same chart
as the HTML report, as vectors. It takes SvgCanvas's calls in SVG's coordinates (origin top left, y down) and flips
y here, once, for reportlab's (origin bottom left).

Its own module so that only the PDF's renderer loads reportlab: the console and the fit advisor draw SVG.
"""
from reportlab.graphics.shapes import Circle, Drawing, Line, PolyLine, Polygon, Rect, String
from reportlab.lib.colors import Color, HexColor


class DrawingCanvas:
    """Build a reportlab Drawing (a platypus flowable) from the same calls; tooltips have no place in a PDF."""

    def __init__(self, width: float, height: float, title: str, css_class: str = ""):
        self.width, self.height = width, height
        self.drawing = Drawing(width, height)

    @staticmethod
    def _colour(value, opacity=1.0):
        if not value or value == "none":
            return None
        c = HexColor(value)
        return Color(c.red, c.green, c.blue, alpha=opacity)

    def _flat(self, points):
        return [v for x, y in points for v in (x, self.height - y)]

    def rect(self, x, y, w, h, fill, *, stroke=None, tip=None):
        self.drawing.add(Rect(x, self.height - y - h, w, h, fillColor=self._colour(fill),
                              strokeColor=self._colour(stroke)))

    def line(self, x1, y1, x2, y2, stroke="#000000", *, width=1.0, dash=False):
        self.drawing.add(Line(x1, self.height - y1, x2, self.height - y2, strokeColor=self._colour(stroke),
                              strokeWidth=width, strokeDashArray=[4, 3] if dash else None))

    def polyline(self, points, stroke, *, width=1.5):
        self.drawing.add(PolyLine(self._flat(points), strokeColor=self._colour(stroke), strokeWidth=width))

    def polygon(self, points, fill, *, opacity=1.0, stroke=None):
        self.drawing.add(Polygon(self._flat(points), fillColor=self._colour(fill, opacity),
                                 strokeColor=self._colour(stroke)))

    def circle(self, cx, cy, r, fill, *, stroke=None, tip=None):
        self.drawing.add(Circle(cx, self.height - cy, r, fillColor=self._colour(fill), strokeColor=self._colour(stroke)))

    def text(self, x, y, text, *, size=10, anchor="start", bold=False, colour=None):
        self.drawing.add(String(x, self.height - y, str(text), fontSize=size, textAnchor=anchor,
                                fontName="Helvetica-Bold" if bold else "Helvetica",
                                fillColor=self._colour(colour or "#000000")))

    def finish(self):
        return self.drawing
