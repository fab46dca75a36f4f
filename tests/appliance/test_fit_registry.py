"""The fit advisor in the registry: analysed after import, measured after load, shown in the console."""
from pathlib import Path

import pytest
from django.urls import reverse

from appliance import fitting, importer
from appliance.actions import do_deploy, do_start_import
from appliance.modelfiles import OutsideStore
from appliance.models import Deployment, FitAnalysis, ModelVariant
from inference.engine import Engine

pytestmark = pytest.mark.django_db


@pytest.fixture
def moe(demo_dir, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        variant = do_start_import(name="demo-moe", kind="moe", source_path=str(demo_dir / "demo-moe"), actor="test")
    with django_capture_on_commit_callbacks(execute=False) as after_import:
        importer.run_import(variant.pk)
    assert len(after_import) == 1  # the import enqueues the fit analysis
    fitting.run_fit(variant.pk)
    variant.refresh_from_db()
    return variant


def test_an_imported_variant_gets_a_verdict_for_this_box(moe):
    fit = FitAnalysis.objects.get(variant=moe)
    assert fit.verdict == "fits"
    assert fit.report["parameters"]["total"] == moe.params_total
    assert fit.report["experts"]["experts"] == 16
    assert (fitting.charts_dir(moe) / "memory.svg").read_text().startswith("<svg")
    assert (fitting.charts_dir(moe) / "experts.svg").exists()


def test_measured_allocation_matches_the_prediction(moe):
    deployment = do_deploy(moe, actor="test")
    from inference.engine.server import measured_allocation

    with Engine(Path(moe.store_path), device="cpu") as engine:
        fitting.record_measurement(deployment.pk, measured_allocation(engine))
    moe.deployment = Deployment.objects.get(pk=deployment.pk)
    rows = {row["figure"].split(" (")[0]: row for row in fitting.predicted_vs_measured(moe)}
    assert rows["parameters"]["difference"] == 0
    assert rows["weight bytes"]["within"], rows["weight bytes"]
    assert rows["KV bytes per token"]["within"], rows["KV bytes per token"]


def test_the_console_shows_the_fit_page(moe, admin_client):
    page = admin_client.get(reverse("admin:appliance_modelvariant_fit", args=[moe.pk]) + "?users=4").content.decode()
    assert "Idle experts" in page
    assert "data:image/svg+xml;base64," in page
    # The pick weighs the decode speed measured on this box at analysis time, which the machine's other work
    # moves; the page must show what the advisor decided, with every variant's reason.
    advised = fitting.recommendation(4, 4096)
    assert f"Recommended: <b>{advised.choice or 'none of the registered variants'}</b>" in page
    assert "<b>demo-moe</b>: " + advised.reasons["demo-moe"].split(" (")[0] in page
    listing = admin_client.get(reverse("admin:appliance_modelvariant_changelist")).content.decode()
    assert "fits (+" in listing


def test_the_fit_page_sets_measured_expert_hits_beside_the_prediction(moe, admin_client):
    import asyncio

    from appliance import engine_client
    from inference.engine import SamplingParams

    async def generate(engine):
        handle = engine.submit(engine.encode_chat([{"role": "user", "content": "hello"}]),
                               SamplingParams(max_tokens=8, temperature=0))
        async for _ in handle:
            pass

    with Engine(Path(moe.store_path), device="cpu") as engine:
        engine_client.register(moe.name, engine)
        try:
            asyncio.run(generate(engine))
            page = admin_client.get(reverse("admin:appliance_modelvariant_fit", args=[moe.pk])).content.decode()
        finally:
            engine_client.unregister(moe.name)
    assert "measured on the loaded engine" in page
    assert "experts hit (measured)" in page
    assert "<svg" in page


@pytest.mark.parametrize("name", ["../outside", "..", ""])
def test_a_charts_folder_never_lies_outside_the_fit_folder(name):
    with pytest.raises(OutsideStore):
        fitting.charts_dir(ModelVariant(name=name))  # a row stored before names were checked


def test_the_fit_page_predicts_a_workload_with_plans_and_a_chart(moe, admin_client):
    url = reverse("admin:appliance_modelvariant_fit", args=[moe.pk])
    page = admin_client.get(url + "?in=64&out=32&concurrency=4").content.decode()
    assert "Predicted throughput for a workload" in page and "output tokens/s" in page
    assert "builtin tp1 on" in page and "Plans" in page and "as asked" in page  # a CPU box: the builtin engine
    assert 'alt="predicted throughput against concurrency' in page
    planned = admin_client.get(url + "?in=64&out=32&concurrency=4&engine=vllm&hardware=2xH200").content.decode()
    assert "vllm tp2 on <b>2xH200</b>" in planned


def test_the_fit_page_names_a_bad_workload_instead_of_failing(moe, admin_client):
    url = reverse("admin:appliance_modelvariant_fit", args=[moe.pk])
    for query, message in [("hardware=8xH2O", "unknown GPU"), ("engine=tgi", "unknown engine"),
                           ("plan=tp4", "CPU only"), ("concurrency=0", "bad value"), ("in=" + "9" * 5000, "bad value")]:
        response = admin_client.get(url + "?in=64&out=32&concurrency=4&" + query)
        assert response.status_code == 200 and message in response.content.decode(), query
