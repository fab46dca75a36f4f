"""The canvas the charts draw on: a handful of shapes in SVG's coordinates (origin top left, y down), written as
SVG text. drawing.py takes the same calls to build a reportlab Drawing for the auditor's PDF."""
from html import escape

FONT = "sans-serif"


class SvgCanvas:
    """Collect SVG elements; finish() returns the document. Every text and tooltip is escaped here."""

    def __init__(self, width: float, height: float, title: str, css_class: str = ""):
        self.width, self.height = width, height
        cls = f' class="{escape(css_class)}"' if css_class else ""
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg"{cls} role="img" viewBox="0 0 {width:g} {height:g}" '
                      f'width="{width:g}" height="{height:g}" font-family="{FONT}" aria-label="{escape(title)}">'
                      f"<title>{escape(title)}</title>"]

    @staticmethod
    def _tip(tip: str | None) -> str:
        return f"<title>{escape(tip)}</title>" if tip else ""

    def _shape(self, element: str, attrs: str, tip: str | None) -> None:
        self.parts.append(f"<{element} {attrs}>{self._tip(tip)}</{element}>" if tip else f"<{element} {attrs}/>")

    def rect(self, x, y, w, h, fill, *, stroke=None, tip=None):
        edge = f' stroke="{stroke}"' if stroke else ""
        self._shape("rect", f'x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{fill}"{edge}', tip)

    def line(self, x1, y1, x2, y2, stroke="#000000", *, width=1.0, dash=False):
        dashes = ' stroke-dasharray="4 3"' if dash else ""
        self._shape("line", f'x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}" '
                    f'stroke-width="{width:g}"{dashes}', None)

    def polyline(self, points, stroke, *, width=1.5):
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        self._shape("polyline", f'points="{coords}" fill="none" stroke="{stroke}" stroke-width="{width:g}"', None)

    def polygon(self, points, fill, *, opacity=1.0, stroke=None):
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        edge = f' stroke="{stroke}"' if stroke else ""
        self._shape("polygon", f'points="{coords}" fill="{fill or "none"}" fill-opacity="{opacity:g}"{edge}', None)

    def circle(self, cx, cy, r, fill, *, stroke=None, tip=None):
        edge = f' stroke="{stroke}"' if stroke else ""
        self._shape("circle", f'cx="{cx:.1f}" cy="{cy:.1f}" r="{r:g}" fill="{fill or "none"}"{edge}', tip)

    def text(self, x, y, text, *, size=10, anchor="start", bold=False, colour=None):
        weight = ' font-weight="bold"' if bold else ""
        fill = f' fill="{colour}"' if colour else ""
        self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size:g}" text-anchor="{anchor}"{weight}{fill}>'
                          f"{escape(str(text))}</text>")

    def finish(self) -> str:
        return "".join(self.parts) + "</svg>"
