"""Render the auditor's report as HTML and as PDF (reportlab), with its chart from the charts package: SVG in the
HTML, the same chart as reportlab vector shapes in the PDF."""
import html
import io
from functools import partial

from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import getSampleStyleSheet
from reportlab.lib.units import cm
from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

import charts
from charts.drawing import DrawingCanvas


def requests_chart(report: dict, canvas=charts.SvgCanvas):
    """Return requests per day, stacked by team, beside requests per model: SVG text, or with
    canvas=DrawingCanvas the same chart as a reportlab Drawing for the PDF."""
    days = list(report["per_day"])
    series = {team: [report["per_day"][day].get(team, 0) for day in days] for team, _ in report["per_team"]}
    per_day = partial(charts.columns, title="Requests per day, by team", labels=days, series=series, stacked=True)
    per_model = partial(charts.hbars, title="Requests per model", colours={"requests": "#4c72b0"},
                        rows=[(model, [("requests", n, None)], None, str(n)) for model, n in report["per_model"]])
    return charts.panels(900, 320, "requests per day and per model", [per_day, per_model], canvas=canvas,
                         weights=[3, 2])


def sections(report: dict) -> list[tuple[str, list[list[str]]]]:
    """Return the report's tables as (heading, rows with a header row first)."""
    cp = report["checkpoints"]
    blocked = report["blocked"]
    tables = [
        ("Identity and period", [["", ""],
            ["Box (checkpoint origin)", report["origin"]], ["Signing key fingerprint", report["fingerprint"]],
            ["Period", f"{report['period'][0]}  to  {report['period'][1]}"],
            ["Events exported", f"{report['events']} (sequence {report['seq_range'][0]}..{report['seq_range'][1]})"],
            ["Exported at", report["export_time"]], ["Report generated", report["generated"]]]),
        ("Verification", [["", ""], ["verify.py at export", report["status"]],
            ["Signed checkpoints", str(cp["count"])],
            ["First / last", f"{cp['first'][0]} events at {cp['first'][1]}  /  {cp['last'][0]} events at {cp['last'][1]}"
             if cp["first"] else "none"],
            ["Longest gap between checkpoints", f"{cp['longest_gap_s']} s (allowed {cp['max_gap_s']} s)"]]),
        ("Requests and tokens per team", [["Team", "Requests", "Failed", "Prompt tokens", "Completion tokens"]] + [
            [team, str(n), str(report["failures"].get(team, 0)), str(report["tokens"][team][0]),
             str(report["tokens"][team][1])] for team, n in report["per_team"]]),
        ("Blocked egress attempts (expected: none)", [["Seq", "Time", "Destination", "Process", "Caller"]] + (
            [[str(b["seq"]), b["time"], b["destination"], b["process"], b["caller"]] for b in blocked]
            or [["-", "none", "", "", ""]])),
        ("Network attestations", [["Attestations", "With connections outside the allowlist", "Latest"],
            [str(len(report["attestations"])), str(report["attestation_alerts"]),
             (lambda a: f"{a['time']}: {a['outside']} outside, {a['listening']} listening ports")(
                 report["attestations"][-1]) if report["attestations"] else "none in the period"]]),
        ("Events by action", [["Action", "Count"]] + [[a, str(n)] for a, n in report["actions"]]),
    ]
    return tables


def render_html(report: dict) -> str:
    """Return the report as one self-contained HTML page."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report['title'])}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;"
             "margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
             "figure{margin:0}figure svg{max-width:100%;height:auto}.ok{color:#176b2c}.bad{color:#b00020}</style></head><body>",
             f"<h1>{html.escape(report['title'])}</h1>",
             f"<p class='{'ok' if report['status'].startswith('OK') else 'bad'}'>{html.escape(report['status'])}</p>",
             f"<figure>{requests_chart(report)}</figure>"]  # the chart escapes its own texts
    for heading, rows in sections(report):
        parts.append(f"<h2>{html.escape(heading)}</h2><table>")
        header, body = rows[0], rows[1:]
        if any(header):
            parts.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>")
        for row in body:
            parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)


def render_pdf(report: dict) -> bytes:
    """Return the report as an A4 PDF."""
    styles = getSampleStyleSheet()
    cell = styles["BodyText"].clone("cell", fontSize=8, leading=10)
    buffer = io.BytesIO()
    doc = SimpleDocTemplate(buffer, pagesize=A4, leftMargin=1.6 * cm, rightMargin=1.6 * cm,
                            topMargin=1.5 * cm, bottomMargin=1.5 * cm, title=report["title"])
    colour = "#176b2c" if report["status"].startswith("OK") else "#b00020"
    chart = requests_chart(report, canvas=DrawingCanvas)
    scale = doc.width / chart.width
    chart.scale(scale, scale)
    chart.width, chart.height = doc.width, chart.height * scale
    story = [Paragraph(report["title"], styles["Title"]),
             Paragraph(f"<font color='{colour}'>{html.escape(report['status'])}</font>", styles["BodyText"]),
             Spacer(1, 0.3 * cm),
             chart]
    for heading, rows in sections(report):
        story.append(Paragraph(heading, styles["Heading3"].clone("h", keepWithNext=1)))
        header, body = rows[0], rows[1:]
        data = ([[Paragraph(f"<b>{html.escape(c)}</b>", cell) for c in header]] if any(header) else []) + [
            [Paragraph(html.escape(c), cell) for c in row] for row in body]
        widths = [doc.width * 0.32, doc.width * 0.68] if len(header) == 2 and not any(header) else None
        table = Table(data, colWidths=widths, hAlign="LEFT", repeatRows=1 if any(header) else 0)
        table.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 0.4, colors.lightgrey),
                                   ("VALIGN", (0, 0), (-1, -1), "TOP")]))
        story.append(table)
    doc.build(story)
    return buffer.getvalue()
