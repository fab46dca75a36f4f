"""The evidence pages of the console: keys, checkpoints, attestations, transcripts."""
import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from audit import transcripts
from audit.attestation import attest
from audit.checkpoints import make_checkpoint
from audit.models import AuditEvent, SigningKey, Transcript

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(client):
    user = User.objects.create_user("staff", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="audit"))
    client.force_login(user)
    return user


def test_the_console_shows_the_key_fingerprint_checkpoints_and_attestations(client, staff):
    make_checkpoint("manual")
    attest()
    key = SigningKey.objects.get()
    page = client.get(reverse("admin:audit_signingkey_changelist")).content.decode()
    assert key.fingerprint[:8] in page
    assert client.get(reverse("admin:audit_checkpoint_changelist")).status_code == 200
    page = client.get(reverse("admin:audit_networkattestation_changelist")).content.decode()
    assert "icon-yes" in page  # the attestation's signature verifies


def test_reading_a_transcript_in_the_console_needs_the_permission_and_is_recorded(client, staff):
    transcripts.set_policy("research", keep=True, actor="admin:alice")
    kept = transcripts.store("research", "tiny", [{"role": "user", "content": "quarterly plan"}], "ok")
    page = client.get(reverse("admin:audit_transcript_change", args=[kept.pk])).content.decode()
    assert "quarterly plan" in page
    assert AuditEvent.objects.filter(action="transcript.read", outcome="ok", actor="admin:staff").exists()
    staff.user_permissions.remove(Permission.objects.get(codename="read_transcript"))
    page = client.get(reverse("admin:audit_transcript_change", args=[kept.pk])).content.decode()
    assert "quarterly plan" not in page and Transcript.objects.count() == 1
    assert AuditEvent.objects.filter(action="transcript.read", outcome="denied").exists()
