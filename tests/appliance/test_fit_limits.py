"""The worker's fit analysis cannot run away: lying configs are refused before a build, and the analysis
runs in a child process that is killed when its time is up or its variant is deleted."""
import json
import sys
from pathlib import Path

import psutil
import pytest

from appliance import fitting, importer
from appliance.actions import do_start_import
from appliance.models import FitAnalysis, ModelVariant
from audit.models import AuditEvent


def imported(demo_dir, capture, name="fit-dense") -> ModelVariant:
    with capture(execute=False):
        variant = do_start_import(name=name, kind="dense", source_path=str(demo_dir / "demo-dense"), actor="test")
    with capture(execute=False):
        importer.run_import(variant.pk)
    variant.refresh_from_db()
    assert variant.status == "ready"
    return variant


def fit_event(name: str) -> AuditEvent:
    return AuditEvent.objects.filter(action="variant.fit", target=name).latest("seq")


def fit_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "fit" in p.cmdline()]


@pytest.mark.django_db
def test_a_lying_config_stored_before_the_checks_is_refused_without_a_build(demo_dir,
                                                                            django_capture_on_commit_callbacks):
    variant = imported(demo_dir, django_capture_on_commit_callbacks)
    config = Path(variant.store_path) / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_hidden_layers": 10_000_000}))
    fitting.run_fit(variant.pk)
    event = fit_event(variant.name)
    assert event.outcome == "refused"
    assert "num_hidden_layers=10,000,000" in event.details["reason"]
    assert not FitAnalysis.objects.filter(variant=variant).exists()


@pytest.mark.django_db
def test_an_analysis_past_its_time_limit_is_killed_and_recorded(demo_dir, settings,
                                                                 django_capture_on_commit_callbacks):
    variant = imported(demo_dir, django_capture_on_commit_callbacks)
    settings.FIT_TIMEOUT_S = 0
    fitting.run_fit(variant.pk)
    event = fit_event(variant.name)
    assert event.outcome == "failed" and "stopped after 0 s (APPLIANCE_FIT_TIMEOUT_S)" in event.details["reason"]
    assert not FitAnalysis.objects.filter(variant=variant).exists()
    assert fit_children() == []


def test_a_cancelled_analysis_is_killed_with_everything_it_started(tmp_path):
    # The child starts a grandchild, as a build that forks would; cancelling kills both.
    cmd = [sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"]
    seen = []

    def cancelled() -> bool:
        # Cancel once both processes run (the task's check that its variant still exists answers here).
        seen[:] = psutil.Process().children(recursive=True)
        return len(seen) == 2

    assert fitting.supervise(cmd, tmp_path, timeout_s=120, cancelled=cancelled) == "cancelled"
    gone, alive = psutil.wait_procs(seen, timeout=30)
    assert alive == [] or all(p.status() == psutil.STATUS_ZOMBIE for p in alive)


def test_supervise_reports_a_finished_child(tmp_path):
    cmd = [sys.executable, "-c", "print('{}')"]
    assert fitting.supervise(cmd, tmp_path, timeout_s=120, cancelled=lambda: False) == "done"
    assert (tmp_path / "stdout").read_text().strip() == "{}"
