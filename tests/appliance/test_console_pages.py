"""The console's own pages, for a staff member, a signed-in non-staff user and a stranger."""
import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils import timezone

from appliance import usage
from appliance.models import ApiKey, Team, VariantStatus
from audit import ledger
from audit.models import AuditEvent

from .teams import team_with_key, variant

pytestmark = pytest.mark.django_db
PAGES = ["/admin/", "/admin/usage/", "/admin/usage/team/research/", "/admin/usage/variant/general/",
         "/admin/usage/export.csv", "/admin/chat/"]


@pytest.fixture
def setup_box():
    variant("general", VariantStatus.DEPLOYED)
    team_with_key("research", requests_per_minute=10)
    usage.record(team="research", key_prefix="sk-box-abcdef", variant="general", prompt_tokens=11,
                 completion_tokens=22, latency_ms=300, ttft_ms=50, outcome="ok")
    usage.record(team="research", key_prefix="sk-box-abcdef", variant="general", prompt_tokens=0,
                 completion_tokens=0, latency_ms=0, ttft_ms=None, outcome="failed")


@pytest.fixture
def staff(client):
    client.force_login(get_user_model().objects.create_superuser("root", password="a-long-password"))
    return client


@pytest.fixture
def member(client):
    client.force_login(get_user_model().objects.create_user("carol", password="a-long-password"))
    return client


@pytest.mark.parametrize("url", PAGES)
def test_staff_see_every_console_page(setup_box, staff, url):
    assert staff.get(url).status_code == 200


@pytest.mark.parametrize("url", PAGES)
def test_a_signed_in_non_staff_user_is_sent_to_sign_in(setup_box, member, url):
    response = member.get(url)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


@pytest.mark.parametrize("url", PAGES)
def test_a_stranger_is_sent_to_sign_in(setup_box, client, url):
    response = client.get(url)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_the_dashboard_shows_the_box_at_a_glance(setup_box, staff):
    ledger.append("egress.blocked", actor="system:web", target="203.0.113.9:443", outcome="denied")
    page = staff.get("/admin/").content.decode()
    assert 'id="variant-states"' in page and "general" in page
    assert "CPU (" in page or "GPU 0" in page
    assert 'id="egress-blocked">1<' in page
    assert 'id="ledger-state">intact<' in page
    assert 'id="errors-day">1<' in page
    assert 'id="queue-depth">–<' in page  # the engine has no stats() hook yet
    assert "<svg" in page and "Model variants" in page  # the chart, and the app list below it
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing fetched from elsewhere


def test_a_team_usage_page_has_charts_limits_and_csv_links(setup_box, staff):
    page = staff.get("/admin/usage/team/research/").content.decode()
    assert page.count('class="chart"') == 8  # requests, tokens, latency, errors; per hour and per day
    assert 'id="requests-day">2<' in page and 'id="tokens-day">33<' in page
    assert "requests per minute" in page and "unlimited" in page
    assert "export.csv?period=hour&amp;team=research" in page


def test_usage_of_an_unknown_team_is_404(setup_box, staff):
    assert staff.get("/admin/usage/team/nobody/").status_code == 404


def test_the_chat_page_lists_variants_and_ships_its_script_from_the_box(setup_box, staff):
    page = staff.get("/admin/chat/").content.decode()
    assert '<option value="general">general' in page
    assert "/static/console/chat.js" in page
    script = staff.get("/static/console/chat.js")
    assert script.status_code == 200 and b"getReader" in b"".join(script.streaming_content)


def test_the_chat_key_is_short_lived_hashed_and_replaces_the_previous_one(staff, settings):
    first = staff.post(reverse("console-chat-key")).json()
    second = staff.post(reverse("console-chat-key")).json()
    team = Team.objects.get(name="console-root")
    assert team.console_user == "root" and second["team"] == "console-root"
    keys = ApiKey.objects.filter(team=team)
    assert not keys.filter(key_hash=first["key"]).exists()
    assert keys.get(prefix=first["prefix"]).revoked_at is not None
    live = keys.get(prefix=second["prefix"])
    assert live.is_active and live.matches(second["key"])
    assert 0 < (live.expires_at - timezone.now()).total_seconds() <= settings.CONSOLE_CHAT_KEY_TTL_S
    assert AuditEvent.objects.filter(action="apikey.create", actor="admin:root").count() == 2


def test_the_chat_key_needs_a_post_with_csrf(staff):
    from django.test import Client

    assert staff.get(reverse("console-chat-key")).status_code == 405
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(get_user_model().objects.get(username="root"))
    assert strict.post(reverse("console-chat-key")).status_code == 403


def test_editing_team_limits_in_the_console_is_a_ledger_event(setup_box, staff):
    team = Team.objects.get(name="research")
    form = {"all_variants": "", "variants": [str(team.pk and variant("other").pk)],
            "requests_per_minute": "5", "tokens_per_minute": "", "tokens_per_day": "1000", "tokens_per_month": "",
            "api_keys-TOTAL_FORMS": "1", "api_keys-INITIAL_FORMS": "1", "api_keys-MIN_NUM_FORMS": "0",
            "api_keys-MAX_NUM_FORMS": "1000", "api_keys-0-id": str(team.api_keys.get().pk),
            "api_keys-0-team": str(team.pk)}
    response = staff.post(reverse("admin:appliance_team_change", args=[team.pk]), form)
    assert response.status_code == 302, response.content.decode()[:3000]
    team.refresh_from_db()
    assert (team.requests_per_minute, team.tokens_per_day, team.all_variants) == (5, 1000, False)
    assert list(team.variants.values_list("name", flat=True)) == ["other"]
    event = AuditEvent.objects.get(action="team.update")
    assert event.actor == "admin:root"
    assert event.details["changes"]["requests_per_minute"] == [10, 5]
    assert event.details["changes"]["variants"] == [[], ["other"]]


def test_creating_a_team_with_limits_in_the_console(staff):
    response = staff.post(reverse("admin:appliance_team_add"), {
        "name": "ops", "all_variants": "on", "tokens_per_month": "1000000", "requests_per_minute": "",
        "tokens_per_minute": "", "tokens_per_day": "", "api_keys-TOTAL_FORMS": "0", "api_keys-INITIAL_FORMS": "0",
        "api_keys-MIN_NUM_FORMS": "0", "api_keys-MAX_NUM_FORMS": "1000"})
    assert response.status_code == 302
    assert Team.objects.get(name="ops").tokens_per_month == 1000000
    assert [e.action for e in AuditEvent.objects.filter(target="ops")] == ["team.create", "team.update"]


def test_editing_a_key_sets_expiry_and_narrows_variants(setup_box, staff):
    key = ApiKey.objects.get(team__name="research")
    general = variant("narrow")
    response = staff.post(reverse("admin:appliance_apikey_change", args=[key.pk]), {
        "name": "ci", "expires_at_0": "2031-01-02", "expires_at_1": "03:04:05", "variants": [str(general.pk)],
        "requests_per_minute": "", "tokens_per_minute": "", "tokens_per_day": "", "tokens_per_month": "99"})
    assert response.status_code == 302, response.content.decode()[:3000]
    key.refresh_from_db()
    assert key.name == "ci" and key.tokens_per_month == 99 and key.expires_at.year == 2031
    assert list(key.variants.values_list("name", flat=True)) == ["narrow"]
    assert AuditEvent.objects.get(action="apikey.update").details["key"] == key.prefix
