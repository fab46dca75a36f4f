"""The auditor's report draws its chart with the box's one chart module: inline SVG in the HTML, the same chart as
vector shapes in the PDF, and a team or model name cannot break either."""
from datetime import datetime, timezone
from xml.etree import ElementTree

from audit.report import build_report
from audit.report_render import render_html, render_pdf, requests_chart

HOSTILE = "<img src=x onerror=alert(1)>"
MANIFEST = {"since_iso": "2026-11-01", "until_iso": "2026-11-03", "origin": "box", "key_fingerprint": "ab",
            "export_time": 0, "first_seq": 1, "last_seq": 3, "max_gap_s": 60}


def report() -> dict:
    events = [{"action": "chat.completion", "actor": f"team:{team}", "target": model, "outcome": "ok",
               "time": f"2026-11-0{day}T10:00:00Z", "seq": n, "details": {"model": model, "prompt_tokens": 3}}
              for n, (team, model, day) in enumerate([("alpha", "demo-moe", 1), (HOSTILE, HOSTILE, 2),
                                                      ("alpha", "demo-moe", 2)])]
    return build_report(MANIFEST, events, [], "OK: verified", generated=datetime(2026, 11, 4, tzinfo=timezone.utc))


def test_the_html_report_inlines_the_chart_as_svg_with_names_escaped():
    page = render_html(report())
    svg = page[page.index("<svg"):page.index("</svg>") + len("</svg>")]
    assert HOSTILE in "".join(ElementTree.fromstring(svg).itertext())
    assert HOSTILE not in page and "data:image/png" not in page


def test_the_pdf_report_embeds_the_same_chart_without_an_image():
    assert requests_chart(report()).startswith("<svg")
    pdf = render_pdf(report())
    assert pdf.startswith(b"%PDF") and b"/Subtype /Image" not in pdf  # vector shapes, not a picture
