"""The console: the Django admin pages and their lifecycle actions, as a signed-in administrator."""
from pathlib import Path

import pytest
from django.urls import reverse

from appliance import actions, importer
from appliance.models import ApiKey, Deployment, DesiredState, ModelVariant, Team, VariantStatus
from audit.models import AuditEvent

pytestmark = pytest.mark.django_db


@pytest.fixture
def console(client, django_user_model):
    admin = django_user_model.objects.create_superuser("root", password="a-long-password")
    client.force_login(admin)
    return client


@pytest.fixture
def ready_variant(demo_dir, console, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        console.post(reverse("admin:appliance_modelvariant_add"),
                     {"name": "demo-dense", "kind": "dense", "source_path": str(demo_dir / "demo-dense")})
    variant = ModelVariant.objects.get(name="demo-dense")
    importer.run_import(variant.pk)
    variant.refresh_from_db()
    return variant


def test_the_console_requires_sign_in(client):
    response = client.get(reverse("admin:appliance_modelvariant_changelist"))
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_importing_from_the_console_enqueues_the_worker(demo_dir, console, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = console.post(reverse("admin:appliance_modelvariant_add"),
                                {"name": "demo-moe", "kind": "moe", "source_path": str(demo_dir / "demo-moe")})
    assert response.status_code == 302
    assert len(callbacks) == 1
    variant = ModelVariant.objects.get(name="demo-moe")
    assert variant.status == VariantStatus.IMPORTING
    assert AuditEvent.objects.filter(action="variant.import", actor="admin:root", outcome="queued").exists()


def test_import_form_names_a_missing_directory(console, tmp_path):
    response = console.post(reverse("admin:appliance_modelvariant_add"),
                            {"name": "x", "kind": "dense", "source_path": str(tmp_path / "absent")})
    assert response.status_code == 200
    assert "is not a directory or a GGUF file on this box" in response.content.decode()
    assert not ModelVariant.objects.exists()


def test_the_variant_list_shows_status_progress_and_the_random_weight_label(ready_variant, console):
    page = console.get(reverse("admin:appliance_modelvariant_changelist")).content.decode()
    assert "demo-dense" in page
    assert "random-weight demo" in page
    assert "<progress" in page
    assert "Ready" in page


def test_deploy_and_undeploy_actions_set_the_desired_state(ready_variant, console):
    url = reverse("admin:appliance_modelvariant_changelist")
    console.post(url, {"action": "deploy", "_selected_action": [ready_variant.pk]})
    assert Deployment.objects.get(variant=ready_variant).desired == DesiredState.DEPLOYED
    console.post(url, {"action": "undeploy", "_selected_action": [ready_variant.pk]})
    assert Deployment.objects.get(variant=ready_variant).desired == DesiredState.UNDEPLOYED
    actions = list(AuditEvent.objects.filter(actor="admin:root").values_list("action", flat=True))
    assert "deployment.deploy" in actions and "deployment.undeploy" in actions


def test_deploying_a_variant_that_is_not_ready_shows_why(console):
    variant = ModelVariant.objects.create(name="half", kind="dense", source_path="/x")
    response = console.post(reverse("admin:appliance_modelvariant_changelist"),
                            {"action": "deploy", "_selected_action": [variant.pk]}, follow=True)
    assert "only a ready variant can be deployed" in response.content.decode()


def test_delete_action_asks_for_confirmation_first(ready_variant, console):
    response = console.post(reverse("admin:appliance_modelvariant_changelist"),
                            {"action": "delete_variants", "_selected_action": [ready_variant.pk]})
    page = response.content.decode()
    assert response.status_code == 200
    assert "Yes, delete them and their files" in page and ready_variant.name in page
    assert ModelVariant.objects.filter(pk=ready_variant.pk).exists()
    assert Path(ready_variant.store_path).is_dir()


def test_delete_action_removes_the_variant_once_confirmed(ready_variant, console, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        console.post(reverse("admin:appliance_modelvariant_changelist"),
                     {"action": "delete_variants", "_selected_action": [ready_variant.pk], "post": "yes"})
    assert not ModelVariant.objects.exists()
    assert not Path(ready_variant.store_path).exists()


def test_a_new_team_key_is_shown_once_and_stored_as_a_hash(console):
    team = Team.objects.create(name="research")
    response = console.post(reverse("admin:appliance_team_changelist"),
                            {"action": "issue_key", "_selected_action": [team.pk]}, follow=True)
    page = response.content.decode()
    key = ApiKey.objects.get(team=team)
    assert key.prefix in page
    shown = page.split("<code>")[1].split("</code>")[0]
    assert shown.startswith(key.prefix) and len(shown) > 40
    again = console.get(reverse("admin:appliance_team_change", args=[team.pk])).content.decode()
    assert shown not in again


def test_audit_events_are_read_only_in_the_console(ready_variant, console):
    event = AuditEvent.objects.first()
    assert console.get(reverse("admin:audit_auditevent_changelist")).status_code == 200
    page = console.get(reverse("admin:audit_auditevent_change", args=[event.pk])).content.decode()
    assert 'name="_save"' not in page


def test_deploy_on_chosen_nodes_asks_where_then_places_the_deployment_and_its_replicas(ready_variant, console):
    for name in ("node-2", "node-3"):
        actions.do_register_node(name, address="http://127.0.0.2:8000", version="0.1.0", gpus=[],
                                 memory_bytes=2**34, actor="test")
    url = reverse("admin:appliance_modelvariant_changelist")
    asked = console.post(url, {"action": "deploy_on_nodes", "_selected_action": [ready_variant.pk]})
    assert asked.status_code == 200 and b'id="placement"' in asked.content
    assert b'value="anywhere"' in asked.content and b'value="node-3"' in asked.content
    assert not Deployment.objects.filter(variant=ready_variant).exists()  # nothing happens before the form's post
    console.post(url, {"action": "deploy_on_nodes", "_selected_action": [ready_variant.pk], "post": "yes",
                       "node": "node-2", "replicas": ["node-3"]})
    deployment = Deployment.objects.get(variant=ready_variant)
    assert (deployment.node, deployment.replicas, deployment.desired) == ("node-2", ["node-3"], DesiredState.DEPLOYED)
    event = AuditEvent.objects.filter(action="deployment.deploy").latest("seq")
    assert event.actor == "admin:root" and event.details["placed_on"] == "node-2"
    refused = console.post(url, {"action": "deploy_on_nodes", "_selected_action": [ready_variant.pk], "post": "yes",
                                 "node": "elsewhere"})
    assert refused.status_code == 200 and b"Select a valid choice" in refused.content
