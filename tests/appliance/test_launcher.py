"""`make run`'s supervisor: a child that dies is restarted, with backoff and a bound, and named with its log."""
import signal
import sys
import time

import pytest

from appliance import launcher

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
FAILER = [sys.executable, "-c", "import sys; print('boom', flush=True); sys.exit(3)"]


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    """Restart after 10 ms instead of a second, so a test sees several restarts quickly."""
    monkeypatch.setattr(launcher, "RESTART_BACKOFF_S", 0.01)


def check_until(supervisor, done, timeout: float = 60.0) -> None:
    """Call supervisor.check() until done() is true (timeout only bounds the wait)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the supervisor did not get there in time"
        supervisor.check()
        time.sleep(0.02)


def test_a_child_that_died_is_restarted_and_named_with_its_exit_code_and_log(tmp_path, capsys):
    supervisor = launcher.Supervisor({"worker": SLEEPER}, tmp_path / "logs")
    supervisor.start("worker")
    first = supervisor.procs["worker"]
    try:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        check_until(supervisor, lambda: supervisor.procs["worker"] is not first)
        assert supervisor.procs["worker"].poll() is None
    finally:
        supervisor.stop()
    out = capsys.readouterr().out
    log = tmp_path / "logs" / "worker.log"
    assert (f"[appliance] worker exited with code -9 (killed by SIGKILL); restarting it in 0.01s "
            f"(restart 1 of 5 in 10 minutes; log {log})") in out
    assert out.count("worker started (pid") == 2 and "worker stopped" in out


def test_a_child_that_keeps_dying_is_given_up_on_after_the_bound(tmp_path, capsys):
    supervisor = launcher.Supervisor({"beat": FAILER, "web": SLEEPER}, tmp_path / "logs")
    for name in ("beat", "web"):
        supervisor.start(name)
    try:
        with pytest.raises(SystemExit, match=r"beat exited with code 3 after 5 restarts in 10 minutes; giving up"):
            check_until(supervisor, lambda: False)
        assert supervisor.procs["web"].poll() is None  # the others ran on until the bound was passed
    finally:
        supervisor.stop()
    out = capsys.readouterr().out
    assert [f"restart {n} of 5" in out for n in range(1, 6)] == [True] * 5
    assert "restarting it in 0.01s" in out and "restarting it in 0.16s" in out  # the backoff doubles
    assert (tmp_path / "logs" / "beat.log").read_text().count("boom") == 6  # the first run and 5 restarts
    assert supervisor.procs["web"].poll() is not None  # stop() ended the survivor too


def test_exit_codes_are_described_in_words():
    assert launcher.exited(2) == "exited with code 2"
    assert launcher.exited(-15) == "exited with code -15 (killed by SIGTERM)"
