"""Analyses and loads cannot run away: a lying config is refused before anything builds it (fit analysis,
reconciler, engine), the analysis runs in a child killed when its time is up or its variant is gone, and an
engine whose deployment was undeployed while it was being built is dropped as soon as the build returns."""
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from appliance import fitting, importer, reconciler
from appliance.actions import do_deploy, do_start_import, do_undeploy
from appliance.modelfiles import hash_dir
from appliance.models import Deployment, FitAnalysis, ModelVariant
from audit.models import AuditEvent
from appliance import engine_client
from inference.engine import Engine
from inference.fit.bounds import ModelOutOfBounds
from tests.weightlies import copy_model, edit_json


def imported(demo_dir, capture, name="fit-dense") -> ModelVariant:
    with capture(execute=False):
        variant = do_start_import(name=name, kind="dense", source_path=str(demo_dir / "demo-dense"), actor="test")
    with capture(execute=False):
        importer.run_import(variant.pk)
    variant.refresh_from_db()
    assert variant.status == "ready"
    return variant


def lie_in_store(variant: ModelVariant, **config) -> None:
    """Change the stored config and its manifest, as a variant imported before the weight checks would be."""
    edit_json(Path(variant.store_path) / "config.json", **config)
    variant.manifest = hash_dir(Path(variant.store_path))
    variant.save()


def last_event(action: str, name: str) -> AuditEvent:
    return AuditEvent.objects.filter(action=action, target=name).latest("seq")


def fit_event(name: str) -> AuditEvent:
    return last_event("variant.fit", name)


def cmdline(process: psutil.Process) -> list[str]:
    """Return a process's command line, or [] once it has gone."""
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def fit_children() -> list[psutil.Process]:
    """Return this test process's own analyses (direct children: a live box's worker may run analyses of its own)."""
    return [p for p in psutil.Process().children() if "fit" in cmdline(p)]


@pytest.mark.django_db
def test_a_lying_config_stored_before_the_checks_is_refused_without_a_build(demo_dir,
                                                                            django_capture_on_commit_callbacks):
    variant = imported(demo_dir, django_capture_on_commit_callbacks)
    lie_in_store(variant, num_hidden_layers=10_000_000)
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
    marker = f"analysis-{uuid.uuid4().hex}"  # tells this child from the test run's others (a live box's processes)
    script = f"import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)  # {marker}"
    cmd = [sys.executable, "-c", script]
    seen = []

    def cancelled() -> bool:
        # Cancel once both processes run (the task's check that its variant still exists answers here).
        seen[:] = [tree for child in psutil.Process().children() if marker in " ".join(cmdline(child))
                   for tree in (child, *child.children(recursive=True))]
        return len(seen) == 2

    assert fitting.supervise(cmd, tmp_path, timeout_s=120, cancelled=cancelled) == "cancelled"
    gone, alive = psutil.wait_procs(seen, timeout=30)
    assert alive == [] or all(p.status() == psutil.STATUS_ZOMBIE for p in alive)


def test_supervise_reports_a_finished_child(tmp_path):
    cmd = [sys.executable, "-c", "print('{}')"]
    assert fitting.supervise(cmd, tmp_path, timeout_s=120, cancelled=lambda: False) == "done"
    assert (tmp_path / "stdout").read_text().strip() == "{}"


@pytest.mark.django_db
def test_the_loader_refuses_a_lying_stored_variant_before_building(demo_dir, django_capture_on_commit_callbacks):
    variant = imported(demo_dir, django_capture_on_commit_callbacks)
    lie_in_store(variant, num_hidden_layers=10_000_000)
    deployment = do_deploy(variant, actor="test")
    reconciler.load(Deployment.objects.select_related("variant").get(pk=deployment.pk))
    deployment.refresh_from_db()
    assert deployment.actual == "failed" and "num_hidden_layers=10,000,000" in deployment.detail
    assert last_event("deployment.load", variant.name).outcome == "refused"
    assert engine_client.get(variant.name) is None


@pytest.mark.django_db
def test_an_engine_undeployed_while_it_was_built_is_dropped_when_the_build_returns(
        demo_dir, django_capture_on_commit_callbacks):
    variant = imported(demo_dir, django_capture_on_commit_callbacks)
    picked = do_deploy(variant, actor="test")  # what the reconciler read before it started building
    picked = Deployment.objects.select_related("variant").get(pk=picked.pk)
    do_undeploy(variant, actor="test")  # arrives during the build
    reconciler.load(picked)
    assert engine_client.get(variant.name) is None
    picked.refresh_from_db()
    assert picked.actual == "undeployed"
    event = last_event("deployment.load", variant.name)
    assert event.outcome == "cancelled" and "while loading" in event.details["reason"]


def test_the_engine_refuses_a_config_its_weight_files_cannot_hold(demo_dir, tmp_path):
    model = copy_model(demo_dir / "demo-dense", tmp_path / "absurd")
    edit_json(model / "config.json", num_hidden_layers=10_000_000)
    with pytest.raises(ModelOutOfBounds, match="num_hidden_layers=10,000,000.*files hold 0.004 GB"):
        Engine(model, device="cpu")
