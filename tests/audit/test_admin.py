import pytest
from django.conf import settings
from django.contrib import admin
from django.contrib.auth.models import User
from django.test import RequestFactory

from audit.ledger import append
from audit.models import AuditEvent

pytestmark = pytest.mark.django_db


@pytest.fixture
def superuser_request():
    """Return a request made by a superuser, who may do anything the admin allows."""
    request = RequestFactory().get("/admin/audit/auditevent/")
    request.user = User(username="root", is_superuser=True, is_staff=True, is_active=True)
    return request


def test_admin_lets_nobody_add_change_or_delete_events(superuser_request):
    model_admin = admin.site._registry[AuditEvent]
    event = append("auth.failed", actor="key:ab12cd", outcome="denied")
    assert model_admin.has_view_permission(superuser_request, event)
    assert not model_admin.has_add_permission(superuser_request)
    assert not model_admin.has_change_permission(superuser_request, event)
    assert not model_admin.has_delete_permission(superuser_request, event)
    assert "delete_selected" not in model_admin.get_actions(superuser_request)


def test_admin_shows_details_as_indented_escaped_json():
    model_admin = admin.site._registry[AuditEvent]
    event = append("chat.completion", actor="team:research", details={"b": "<x>", "a": 1})
    assert model_admin.details_pretty(event) == (
        '<pre>{\n  &quot;a&quot;: 1,\n  &quot;b&quot;: &quot;&lt;x&gt;&quot;,\n'
        f'  &quot;node&quot;: &quot;{settings.AUDIT_NODE}&quot;\n}}</pre>'
    )
