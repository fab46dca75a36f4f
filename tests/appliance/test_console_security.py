"""Console sign-in throttling, the production settings, and the forced password change."""
import json
import os
import subprocess
import sys

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import override_settings

from appliance.models import LoginFailure
from audit.models import AuditEvent

pytestmark = pytest.mark.django_db
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def root():
    return get_user_model().objects.create_superuser("root", password="the-right-password")


def sign_in(client, password, username="root"):
    return client.post("/admin/login/", {"username": username, "password": password, "next": "/admin/"})


@override_settings(CONSOLE_LOGIN_MAX_FAILURES=3)
def test_repeated_failed_sign_ins_lock_the_user_name_out(client, root):
    for _ in range(3):
        assert sign_in(client, "wrong").status_code == 200
    locked = sign_in(client, "the-right-password")
    assert locked.status_code == 429 and "Too many failed sign-ins" in locked.content.decode()
    assert int(locked["Retry-After"]) > 0
    assert AuditEvent.objects.filter(action="console.lockout", target="root").count() == 1
    # Each failure is on record; the attempt refused while locked out is not (the lockout bounds the events).
    assert AuditEvent.objects.filter(action="console.sign_in_failed", target="root").count() == 3


def test_a_single_failed_sign_in_is_a_ledger_event_without_the_password(client, root):
    assert sign_in(client, "hunter2-not-the-password").status_code == 200
    event = AuditEvent.objects.get(action="console.sign_in_failed")
    assert (event.actor, event.target, event.outcome) == ("sign-in:root", "root", "denied")
    assert event.details == {"address": "127.0.0.1", "username_length": 4, "node": settings.APPLIANCE_NODE}
    assert not any("hunter2" in json.dumps(e.body_fields(), default=str) for e in AuditEvent.objects.all())


def test_a_hostile_user_name_is_recorded_escaped_and_bounded(client, root):
    hostile = "\x1b[31mroot\n\u200b" + "x" * 500
    sign_in(client, "wrong", username=hostile)
    event = AuditEvent.objects.get(action="console.sign_in_failed")
    assert event.target.startswith("\\x1b[31mroot\\n\\u200bxxx") and event.target.endswith("…")
    assert len(event.target) == 64 and event.actor == f"sign-in:{event.target}"
    assert event.target.isprintable() and event.details["username_length"] == 150  # the view's own bound


def test_a_successful_sign_in_is_not_a_failure(client, root):
    assert sign_in(client, "the-right-password").status_code == 302
    assert not AuditEvent.objects.filter(action="console.sign_in_failed").exists()


@override_settings(CONSOLE_LOGIN_MAX_FAILURES=3)
def test_a_successful_sign_in_clears_the_failures(client, root):
    for _ in range(2):
        sign_in(client, "wrong")
    assert sign_in(client, "the-right-password").status_code == 302
    assert not LoginFailure.objects.filter(username="root").exists()


@override_settings(CONSOLE_LOGIN_MAX_FAILURES=100, CONSOLE_LOGIN_MAX_FAILURES_PER_ADDRESS=4)
def test_one_address_guessing_many_user_names_is_throttled(client, root):
    for n in range(4):
        sign_in(client, "wrong", username=f"user{n}")
    assert sign_in(client, "the-right-password").status_code == 429


@override_settings(APPLIANCE_PRODUCTION=True)
def test_production_mode_forces_a_password_not_chosen_in_the_console_to_change(client, root):
    assert sign_in(client, "the-right-password").status_code == 302
    response = client.get("/admin/")
    assert response.status_code == 302 and response["Location"].endswith("/admin/password_change/")
    assert client.get("/admin/usage/").status_code == 302
    changed = client.post("/admin/password_change/", {"old_password": "the-right-password",
                                                      "new_password1": "a-new-long-password-9",
                                                      "new_password2": "a-new-long-password-9"})
    assert changed.status_code == 302
    assert client.get("/admin/").status_code == 200
    assert AuditEvent.objects.filter(action="console.password_change", target="root").exists()


def test_outside_production_mode_no_password_change_is_forced(client, root):
    sign_in(client, "the-right-password")
    assert client.get("/admin/").status_code == 200


def test_check_deploy_passes_with_the_production_settings(tmp_path):
    env = {**os.environ, "APPLIANCE_HOME": str(tmp_path), "APPLIANCE_PRODUCTION": "1",
           "ALLOWED_HOSTS": "box.example.internal", "DJANGO_SECRET_KEY_FILE": str(tmp_path / "secret")}
    (tmp_path / "secret").write_text("k" * 10 + "-a-long-random-secret-from-the-operator-0123456789abcdefghij")
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_complains_without_production_mode(tmp_path):
    env = {**os.environ, "APPLIANCE_HOME": str(tmp_path)}
    env.pop("APPLIANCE_PRODUCTION", None)
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "SESSION_COOKIE_SECURE" in result.stderr + result.stdout
