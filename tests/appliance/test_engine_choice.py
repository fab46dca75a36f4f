"""A deployment's engine: chosen at deploy (command line, console), refused when unknown, `auto` resolved at load."""
import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from appliance import actions, engines, importer, reconciler
from appliance.models import ActualState, Deployment, Engine
from appliance.names import ENGINE_NAMES, InvalidName
from audit.models import AuditEvent

pytestmark = pytest.mark.django_db


@pytest.fixture
def variant(demo_dir, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        variant = actions.do_start_import(name="demo-dense", kind="dense", source_path=str(demo_dir / "demo-dense"),
                                          actor="test")
    importer.run_import(variant.pk)
    variant.refresh_from_db()
    return variant


def test_the_names_rule_and_the_models_choices_list_the_same_engines():
    assert ENGINE_NAMES == tuple(Engine.values)


def test_a_first_deploy_runs_on_the_builtin_engine(variant):
    assert actions.do_deploy(variant, actor="test").engine == "builtin"


def test_deploy_on_the_command_line_names_its_engine_and_records_it(variant, capsys):
    call_command("deploy", variant.name, "--engine", "vllm")
    assert "deploy requested on engine vllm" in capsys.readouterr().out
    assert Deployment.objects.get(variant=variant).engine == "vllm"
    event = AuditEvent.objects.filter(action="deployment.deploy").latest("seq")
    assert (event.details["engine"], event.details["engine_flags"]) == ("vllm", [])


def test_an_unknown_engine_is_refused_with_the_known_ones(variant):
    with pytest.raises(CommandError, match="engine 'tgi' is refused: use one of builtin, vllm, sglang, auto"):
        call_command("deploy", variant.name, "--engine", "tgi")
    with pytest.raises(InvalidName):
        actions.do_deploy(variant, actor="test", engine="VLLM")
    assert not Deployment.objects.exists()


def test_a_running_deployment_keeps_its_engine_until_undeployed(variant):
    actions.do_deploy(variant, actor="test", engine="vllm")
    with pytest.raises(actions.ActionRefused, match="deployed on vllm; undeploy it before deploying it on builtin"):
        actions.do_deploy(variant, actor="test", engine="builtin")
    actions.do_undeploy(variant, actor="test")
    assert actions.do_deploy(variant, actor="test", engine="builtin").engine == "builtin"


def test_a_plain_deploy_keeps_the_engine_chosen_before(variant):
    actions.do_deploy(variant, actor="test", engine="auto")
    actions.do_undeploy(variant, actor="test")
    assert actions.do_deploy(variant, actor="test").engine == "auto"


def test_the_console_deploys_on_the_chosen_engine_and_shows_it(variant, client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("root", password="a-long-password"))
    url = reverse("admin:appliance_modelvariant_changelist")
    client.post(url, {"action": "deploy_on_auto", "_selected_action": [variant.pk]})
    assert Deployment.objects.get(variant=variant).engine == "auto"
    page = client.get(url).content.decode()
    assert "auto: undeployed → deployed" in page
    assert "Deploy on vLLM" in page and "Deploy on SGLang" in page


def test_auto_stays_builtin_without_cuda_even_with_vllm_installed(settings, tmp_path):
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    settings.VLLM_PYTHON = str(python)
    assert engines.installed(settings.VLLM_PYTHON)
    assert not engines.cuda_present()  # the CPU box these tests run on
    assert engines.resolve("auto") == "builtin"
    assert engines.resolve("vllm") == "vllm"


def test_vllm_without_its_virtualenv_fails_the_load_naming_the_setting(variant, settings):
    settings.VLLM_PYTHON = ""
    dep = actions.do_deploy(variant, actor="test", engine="vllm")
    reconciler.load(Deployment.objects.select_related("variant").get(pk=dep.pk))
    dep.refresh_from_db()
    assert dep.actual == ActualState.FAILED
    assert "vLLM is not installed on this box: set APPLIANCE_VLLM_PYTHON" in dep.detail


def test_sglang_is_refused_at_load_naming_what_is_supported(variant):
    dep = actions.do_deploy(variant, actor="test", engine="sglang")
    reconciler.load(Deployment.objects.select_related("variant").get(pk=dep.pk))
    dep.refresh_from_db()
    assert dep.actual == ActualState.FAILED
    assert "the sglang engine is not supported by this appliance yet" in dep.detail
