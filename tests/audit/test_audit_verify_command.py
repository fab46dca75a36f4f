import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from audit.ledger import append
from tests.audit import tamper

ROOT = Path(__file__).resolve().parents[2]

# Runs `manage.py audit_verify` through Django's real entry point (so exit codes
# are the ones a shell sees), pointed at the test database.
RUN_COMMAND = """
import sys
import django
django.setup()
from django.db import connections
connections["default"].settings_dict["NAME"] = sys.argv[1]
from django.core.management import execute_from_command_line
execute_from_command_line(["manage.py", "audit_verify"])
"""


def run_audit_verify() -> subprocess.CompletedProcess:
    """Run audit_verify in a separate process against the test database."""
    return subprocess.run(
        [sys.executable, "-c", RUN_COMMAND, str(connection.settings_dict["NAME"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.django_db
def test_command_prints_a_summary_of_an_intact_ledger(capsys):
    append("system.start", actor="system:web")
    last = append("chat.completion", actor="team:research")
    call_command("audit_verify")
    assert capsys.readouterr().out.strip() == (
        f"audit ledger intact: 2 events, head hash {last.hash}; no checkpoints yet")


@pytest.mark.django_db
def test_command_names_the_first_broken_event():
    for _ in range(3):
        append("chat.completion", actor="team:research")
    tamper.edit(2, actor="team:other")
    with pytest.raises(CommandError, match="BROKEN at event 2: event 2: body does not match") as info:
        call_command("audit_verify")
    assert info.value.returncode == 1


def test_command_exits_0_when_intact_and_1_when_broken(committed_ledger):
    for _ in range(3):
        append("chat.completion", actor="team:research")
    intact = run_audit_verify()
    assert (intact.returncode, intact.stderr) == (0, "")
    assert "audit ledger intact: 3 events" in intact.stdout

    tamper.delete(2)
    broken = run_audit_verify()
    assert broken.returncode == 1
    assert "BROKEN at event 2: sequence gap: expected 2, found 3" in broken.stderr
