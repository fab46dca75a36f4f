"""Render the auditor's report as HTML and as PDF (reportlab), with matplotlib charts."""
import base64
import html
import io

import matplotlib

matplotlib.use("Agg")  # no display on the box; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from reportlab.lib import colors  # noqa: E402
from reportlab.lib.pagesizes import A4  # noqa: E402
from reportlab.lib.styles import getSampleStyleSheet  # noqa: E402
from reportlab.lib.units import cm  # noqa: E402
from reportlab.platypus import Image, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle  # noqa: E402


def requests_chart(report: dict) -> bytes:
    """Return a PNG of requests per day, stacked by team, beside requests per model."""
    days = list(report["per_day"])
    teams = [team for team, _ in report["per_team"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [3, 2]})
    bottom = [0] * len(days)
    for team in teams:
        counts = [report["per_day"][day].get(team, 0) for day in days]
        # Positions, not the day strings: matplotlib would guess those are numbers or dates.
        left.bar(range(len(days)), counts, bottom=bottom, label=team)
        bottom = [b + c for b, c in zip(bottom, counts)]
    left.set_xticks(range(len(days)), days)
    left.set_title("Requests per day, by team", fontsize=10)
    left.tick_params(axis="x", labelrotation=45, labelsize=8)
    if teams:
        left.legend(fontsize=8)
    models = report["per_model"][::-1]
    right.barh(range(len(models)), [n for _, n in models], color="#4c72b0")
    right.set_yticks(range(len(models)), [m for m, _ in models])
    right.set_title("Requests per model", fontsize=10)
    right.tick_params(labelsize=8)
    for axis in (left, right):
        axis.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150)
    plt.close(fig)
    return buffer.getvalue()


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
    chart = base64.b64encode(requests_chart(report)).decode()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report['title'])}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;"
             "margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
             ".ok{color:#176b2c}.bad{color:#b00020}</style></head><body>",
             f"<h1>{html.escape(report['title'])}</h1>",
             f"<p class='{'ok' if report['status'].startswith('OK') else 'bad'}'>{html.escape(report['status'])}</p>",
             f"<img alt='requests per day and per model' src='data:image/png;base64,{chart}' width='100%'>"]
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
    story = [Paragraph(report["title"], styles["Title"]),
             Paragraph(f"<font color='{colour}'>{html.escape(report['status'])}</font>", styles["BodyText"]),
             Spacer(1, 0.3 * cm),
             Image(io.BytesIO(requests_chart(report)), width=doc.width, height=doc.width * 3.2 / 9)]
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
