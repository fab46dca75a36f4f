"""Charts render as SVG; the fit command prints a readable report and JSON."""
import json
from xml.etree import ElementTree

import pytest
from django.core.management import CommandError, call_command

from inference.fit import analyze, render_expert_chart, render_memory_chart



def test_charts_are_svg(demo_dir):
    report = analyze("deepseek-v3", "4xA100-80G+cpu:1024G", 4096)
    for svg in (render_memory_chart(report), render_expert_chart(report)):
        ElementTree.fromstring(svg)  # well-formed
        assert svg.startswith("<svg") and "href" not in svg and "<script" not in svg  # nothing from elsewhere
    assert "routed experts" in render_memory_chart(report) and "host RAM" in render_memory_chart(report)
    with pytest.raises(ValueError):
        render_expert_chart(analyze(demo_dir / "demo-dense", "cpu:64G", 512))


def test_fit_command_prints_a_verdict(capsys):
    call_command("fit", "deepseek-v3", "--hardware", "8xH20", "--context", "4096")
    out = capsys.readouterr().out
    assert "VERDICT      fits" in out and "671.0B" in out and "idle 78%" in out


def test_fit_command_json_and_demo_directory(demo_dir, capsys):
    call_command("fit", str(demo_dir / "demo-moe"), "--hardware", "cpu:64G", "--json")
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"]["verdict"] == "fits" and data["experts"]["experts"] == 16


def test_fit_command_names_a_bad_hardware_part():
    with pytest.raises(CommandError, match="H2O"):
        call_command("fit", "deepseek-v3", "--hardware", "8xH2O")
