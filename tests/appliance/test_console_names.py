"""Names in the console: its forms refuse bad ones with the validator's message; pages survive old bad rows."""
import pytest
from django.urls import reverse

from appliance import usage
from appliance.models import ModelVariant, Team, VariantStatus

pytestmark = pytest.mark.django_db
# Rows a registry without the validator could hold (the CLI wrote such names).
LEGACY = ["../x", "Bad Name", "", "a/b", "dеmo", "x" * 100, "?q=1#frag"]


@pytest.fixture
def console(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("root", password="a-long-password"))
    return client


@pytest.mark.parametrize("name,problem", [("../x", "the character '.'"), ("Demo", "upper-case letter 'D'"),
                                          ("/abs", "path separator '/'"), ("d\u0435mo", "U+0435")])
def test_the_import_form_refuses_a_bad_name_with_the_validators_message(console, demo_dir, name, problem):
    response = console.post(reverse("admin:appliance_modelvariant_add"),
                            {"name": name, "kind": "dense", "source_path": str(demo_dir / "demo-dense")})
    assert response.status_code == 200  # the form again, not a redirect
    errors = " ".join(response.context["adminform"].form.errors["name"])
    assert "variant name" in errors and problem in errors
    assert not ModelVariant.objects.exists()


def test_the_team_form_refuses_a_bad_name(console):
    response = console.post(reverse("admin:appliance_team_add"), {"name": "research team", "all_variants": "on"})
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors["name"]
    assert errors == ["team name 'research team' is refused: it contains whitespace (' '); use 1 to 64 lower-case "
                      "letters, digits, '-' or '_', starting with a letter or digit"]
    assert not Team.objects.exists()


@pytest.mark.parametrize("name", LEGACY)
def test_pages_do_not_fail_on_a_bad_name_already_in_the_database(console, name):
    ModelVariant.objects.create(name=name, kind="dense", source_path="/x", status=VariantStatus.READY)
    Team.objects.create(name=name)
    usage.record(team=name, key_prefix="", variant=name, prompt_tokens=1, completion_tokens=1, latency_ms=1,
                 ttft_ms=1, outcome="ok")
    usage.roll_up()
    for url in ["/admin/", "/admin/usage/", reverse("admin:appliance_team_changelist"),
                reverse("admin:appliance_modelvariant_changelist"), reverse("console-usage-team", args=[name]),
                reverse("console-usage-variant", args=[name]),
                reverse("admin:appliance_modelvariant_fit", args=[ModelVariant.objects.get(name=name).pk])]:
        assert console.get(url).status_code == 200, url


def test_usage_of_a_name_with_a_nul_is_404_not_a_database_error(console):
    assert console.get("/admin/usage/team/a%00b/").status_code == 404
    assert console.get("/admin/usage/export.csv?team=a%00b").status_code == 400
