"""A process killed with SIGKILL in the middle of appending leaves a ledger that verifies and grows."""
import multiprocessing
import os
import signal

from django.db import connection

from audit.checkpoints import make_checkpoint
from audit.ledger import append, verify
from audit.live_verify import verify_live
from audit.models import AuditEvent
from tests.audit.ledger_worker import append_until_killed


def test_a_process_killed_mid_append_leaves_a_verifying_ledger(committed_ledger):
    context = multiprocessing.get_context("spawn")
    for _ in range(3):  # several kills, each at a different point of an append
        started = context.Event()
        victim = context.Process(target=append_until_killed, args=(str(connection.settings_dict["NAME"]), started))
        victim.start()
        assert started.wait(60)
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(30)
        assert victim.exitcode == -signal.SIGKILL
        result = verify()
        assert result.ok, result.reason
        make_checkpoint("heartbeat")
    survivor = append("test.after_crash", actor="test:survivor")
    assert survivor.seq == AuditEvent.objects.count()
    assert verify_live().ok
