"""`make run` (manage.py run_appliance) survives a dead child: kill -9 the worker, the beat and the web in turn;
each comes back with a message naming it and its log, the API answers again, the ledger verifies, and Ctrl-C
stops everything."""
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import psutil
import pytest

from tests.livebox import ROOT, PostgresDatabase, free_port

# make run is the embedded-defaults command, and restarting a dead child does not depend on the backends:
# CI runs this once.
pytestmark = pytest.mark.backend_neutral

STARTED = re.compile(r"\[appliance\] (web|worker|beat) started \(pid (\d+), log (.+)\)")


class Launcher:
    """A run_appliance process in its own APPLIANCE_HOME, with its output read line by line."""

    def __init__(self, home, env: dict, port: int):
        self.home, self.env, self.url = home, env, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "manage.py", "run_appliance", "--port", str(port)], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)  # its own group: a Ctrl-C here reaches only it
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        self.pids: dict[str, int] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 240, since: int | None = None) -> re.Match:
        """Return the match of the first output line matching pattern: a new one, or any from line since on."""
        for line in self.output[since:] if since is not None else ():
            if match := re.search(pattern, line):
                return match
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n" + "\n".join(
                    self.output[-40:])) from None
            self.output.append(line)
            if started := STARTED.search(line):
                self.pids[started.group(1)] = int(started.group(2))
            if match := re.search(pattern, line):
                return match

    def manage(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=300)


def chat_answers(launcher: Launcher, key: str, timeout: float = 180) -> dict:
    """Return a chat completion from demo-dense, retrying while the web process (re)loads its engines."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.post(f"{launcher.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                              json={"model": "demo-dense", "max_tokens": 2,
                                    "messages": [{"role": "user", "content": "hello"}]}, timeout=60)
            if last.status_code == 200:
                return last.json()
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"the API did not answer within {timeout}s: {last!r}")


def registered_pids(launcher: Launcher) -> set[int]:
    """Return the pids registered for network attestations (each process registers itself once it is up)."""
    return {int(p.stem) for p in (launcher.home / "processes").glob("*.json")}


def wait_registered(launcher: Launcher, pid: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while pid not in registered_pids(launcher):
        assert time.monotonic() < deadline, f"pid {pid} never registered:\n" + "\n".join(launcher.output[-40:])
        time.sleep(0.3)


def kill_and_see_it_back(launcher: Launcher, name: str, restarts: dict) -> int:
    """Kill -9 a child; return its new pid once the launcher has said so, naming it, its exit code and its log."""
    old, since = launcher.pids[name], len(launcher.output)
    os.kill(old, signal.SIGKILL)
    restarts[name] += 1
    log = launcher.home / "logs" / f"{name}.log"
    launcher.wait_for(re.escape(f"[appliance] {name} exited with code -9 (killed by SIGKILL); restarting it in "
                                f"{2 ** (restarts[name] - 1)}s (restart {restarts[name]} of 5 in 10 minutes; "
                                f"log {log})"), timeout=60, since=since)
    launcher.wait_for(rf"\[appliance\] {name} started \(pid \d+, log {re.escape(str(log))}\)", timeout=60,
                      since=since)
    assert launcher.pids[name] != old
    return launcher.pids[name]


def test_make_run_restarts_each_child_killed_with_sigkill_and_stops_on_ctrl_c(tmp_path_factory):
    home = tmp_path_factory.mktemp("make-run-home")
    env = {**os.environ, "APPLIANCE_HOME": str(home), "APPLIANCE_QUEUE": f"run-{uuid.uuid4().hex[:8]}",
           "PYTHONUNBUFFERED": "1", "APPLIANCE_RECONCILE_INTERVAL": "0.3"}
    database = PostgresDatabase(env["DATABASE_URL"]) if env.get("DATABASE_URL", "").startswith("postgres") else None
    if database:
        env["DATABASE_URL"] = database.url
    launcher = Launcher(home, env, free_port())
    try:
        launcher.wait_for(r"admin user 'admin' created, password \S+")
        launcher.wait_for(r"demo-moe: .* written")  # the admin line came first: before the steps that can fail
        launcher.wait_for(r"importing demo-dense through the worker")
        # Killed while the launcher waits for the demo variants (imports and loads take seconds from here):
        # beat is restarted, and the start goes on instead of stopping everything.
        restarts, waiting = {"beat": 0, "worker": 0, "web": 0}, len(launcher.output)
        kill_and_see_it_back(launcher, "beat", restarts)
        launcher.wait_for(r"\[appliance\] ready in", since=waiting)
        key = (home / "demo-api-key").read_text().strip()
        assert chat_answers(launcher, key)["choices"]
        # The real model make run ships, next to the three random-weight demos, answers sensibly.
        assert re.search(r"\[appliance\] smollm2-135m: deployed on cpu|\[appliance\] smollm2-135m: deployed on cuda",
                         "\n".join(launcher.output))
        paris = httpx.post(f"{launcher.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": "smollm2-135m", "max_tokens": 16, "temperature": 0, "messages": [
                               {"role": "user", "content": "What is the capital of France?"}]}, timeout=120)
        assert "Paris" in paris.json()["choices"][0]["message"]["content"], paris.text
        for name in ("worker", "beat", "web"):
            new = kill_and_see_it_back(launcher, name, restarts)
            assert psutil.Process(new).is_running()
            wait_registered(launcher, new)  # up far enough to attest its own sockets at start
            assert chat_answers(launcher, key)["choices"]
        assert launcher.proc.poll() is None
        verified = launcher.manage("audit_verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        children = dict(launcher.pids)
        launcher.proc.send_signal(signal.SIGINT)
        assert launcher.proc.wait(timeout=90) == 0
        launcher.wait_for(r"\[appliance\] web stopped", timeout=30)  # the last one stopped
        assert [f"[appliance] {name} stopped" in launcher.output for name in children] == [True] * 3
        assert not [name for name, pid in children.items() if psutil.pid_exists(pid)]
        # Every start of every child attested that child's own sockets (restarted ones included).
        starts = launcher.manage("shell", "--no-imports", "-c", "from audit.models import NetworkAttestation\n"
                                 "print(sorted({(e.actor, p['name'], p['pid']) for e in NetworkAttestation.objects.all()"
                                 " for p in e.details['snapshot']['processes'] if len(e.details['snapshot']"
                                 "['processes']) == 1}))")
        assert all(f"('system:{name}', '{name}', {pid})" in starts.stdout for name, pid in children.items()), (
            starts.stdout + starts.stderr)
        assert launcher.manage("audit_verify").returncode == 0
    finally:
        if launcher.proc.poll() is None:
            os.killpg(launcher.proc.pid, signal.SIGKILL)
            launcher.proc.wait(timeout=30)
        if database:
            database.drop()


def test_the_first_runs_admin_password_is_shown_even_when_a_later_step_fails(tmp_path_factory):
    home = tmp_path_factory.mktemp("make-run-fails")
    (home / "demo-models").write_text("a file where the demo models' directory belongs")  # that step fails
    env = {**os.environ, "APPLIANCE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("APPLIANCE_ADMIN_PASSWORD", None)
    database = PostgresDatabase(env["DATABASE_URL"]) if env.get("DATABASE_URL", "").startswith("postgres") else None
    if database:
        env["DATABASE_URL"] = database.url
    try:
        run = subprocess.run([sys.executable, "manage.py", "run_appliance", "--port", str(free_port())], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode != 0 and "demo-models" in run.stderr
        password = re.search(r"\[appliance\] admin user 'admin' created, password (\S+)", run.stdout).group(1)
        check = subprocess.run([sys.executable, "manage.py", "shell", "--no-imports", "-c",
                                "from django.contrib.auth import authenticate\n"
                                f"print(authenticate(username='admin', password={password!r}) is not None)"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert check.stdout.strip().splitlines()[-1] == "True", check.stderr
        assert "started (pid" not in run.stdout  # it failed before any child started
    finally:
        if database:
            database.drop()
