"""`make run`: set up the box on embedded defaults and run web, worker and beat until Ctrl-C.

Every step reuses what exists, so a second run adds no variants, admins or teams.
"""
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command

from audit.checkpoints import make_checkpoint

from . import actions, bundled, http_limits
from .models import ActualState, Deployment, ModelVariant, Team, VariantStatus

ACTOR = "system:launcher"
DEMO_VARIANTS = {"demo-moe": "moe", "demo-distilled": "distilled", "demo-dense": "dense"}
DEMO_TEAM = "demo"
# A child that dies is started again after RESTART_BACKOFF_S, doubling with each restart; one that
# died RESTART_LIMIT times within RESTART_WINDOW_S is left dead, and `make run` stops everything.
RESTART_LIMIT = 5
RESTART_WINDOW_S = 600
RESTART_BACKOFF_S = 1.0


def say(message: str) -> None:
    print(f"[appliance] {message}", flush=True)


def ensure_admin() -> str:
    """Create the local admin once; return a line describing how to sign in."""
    User = get_user_model()
    username = os.environ.get("APPLIANCE_ADMIN_USER", "admin")
    if User.objects.filter(username=username).exists():
        return f"admin user {username!r} exists (password as printed on its first run)"
    password = os.environ.get("APPLIANCE_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
    User.objects.create_superuser(username=username, email="", password=password)
    if os.environ.get("APPLIANCE_ADMIN_PASSWORD"):
        return f"admin user {username!r} created with the password from APPLIANCE_ADMIN_PASSWORD"
    return f"admin user {username!r} created, password {password}  (shown once; change it in the console)"


def ensure_demo_key() -> str:
    """Return the demo team's key, issuing it on the first run.

    The demo key alone is kept in a 0600 file under APPLIANCE_HOME so that
    `make run` can print it again; real team keys are shown once and stored
    only as hashes.
    """
    path = Path(settings.APPLIANCE_HOME) / "demo-api-key"
    if path.exists() and Team.objects.filter(name=DEMO_TEAM).exists():
        return path.read_text().strip()
    team = actions.do_create_team(DEMO_TEAM, actor=ACTOR)
    _, plaintext = actions.do_issue_api_key(team, actor=ACTOR, name="demo (make run)")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(plaintext + "\n")
    return plaintext


def start_processes(port: int) -> "Supervisor":
    """Start web, worker and beat under a supervisor that restarts them."""
    python = sys.executable
    home = Path(settings.APPLIANCE_HOME)
    queue = settings.CELERY_TASK_DEFAULT_QUEUE
    commands = {
        "worker": [python, "-m", "celery", "-A", "appliance", "worker", "-Q", queue, "-c", "2",
                   "-l", "INFO", "-n", f"worker-{queue}@%h"],
        "beat": [python, "-m", "celery", "-A", "appliance", "beat", "-l", "INFO",
                 "-s", str(home / "celerybeat-schedule")],
        "web": [python, "-m", "uvicorn", "appliance.asgi:application", "--host", "127.0.0.1", "--port", str(port),
                "--lifespan", "off", "--no-access-log", "--http", "appliance.http_limits:HeaderTimeoutProtocol",
                "--timeout-keep-alive", str(http_limits.SERVER_KEEPALIVE_S)],
    }
    supervisor = Supervisor(commands, home / "logs")
    for name in commands:
        supervisor.start(name)
    return supervisor


class Supervisor:
    """Run the children; restart one that died after a backoff, at most RESTART_LIMIT times per RESTART_WINDOW_S."""

    def __init__(self, commands: dict[str, list[str]], logs: Path):
        self.commands = commands
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, list[float]] = {name: [] for name in commands}
        self.due: dict[str, float] = {}  # name -> when a dead child is started again

    def log(self, name: str) -> Path:
        """Return the log file of a child."""
        return self.logs / f"{name}.log"

    def start(self, name: str) -> None:
        """Start one child, appending its output to its log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("ab") as log:  # the child keeps its own copy of the descriptor
            self.procs[name] = subprocess.Popen(self.commands[name], stdout=log, stderr=subprocess.STDOUT,
                                                cwd=settings.BASE_DIR)
        say(f"{name} started (pid {self.procs[name].pid}, log {self.log(name)})")

    def check(self) -> None:
        """Restart the children that died once their backoff is over; raise SystemExit past the bound."""
        now = time.monotonic()
        for name, proc in list(self.procs.items()):
            if name in self.due:
                if now >= self.due[name]:
                    del self.due[name]
                    self.start(name)
                continue
            code = proc.poll()
            if code is None:
                continue
            recent = [t for t in self.restarts[name] if now - t < RESTART_WINDOW_S]
            if len(recent) >= RESTART_LIMIT:
                raise SystemExit(f"[appliance] {name} {exited(code)} after {RESTART_LIMIT} restarts in "
                                 f"{RESTART_WINDOW_S // 60} minutes; giving up and stopping everything "
                                 f"(log {self.log(name)})")
            self.restarts[name] = [*recent, now]
            delay = RESTART_BACKOFF_S * 2 ** len(recent)
            self.due[name] = now + delay
            say(f"{name} {exited(code)}; restarting it in {delay:g}s (restart {len(recent) + 1} of {RESTART_LIMIT} "
                f"in {RESTART_WINDOW_S // 60} minutes; log {self.log(name)})")

    def stop(self) -> None:
        """Stop every child: SIGTERM, then SIGKILL for one still running after 15 s."""
        self.due.clear()
        stop(self.procs)


def exited(code: int) -> str:
    """Return how a child ended, in words: its exit code and, for a signal, the signal's name."""
    if code < 0:
        try:
            return f"exited with code {code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"exited with code {code}"


def seeded_variants(demo_dir: Path) -> dict[str, tuple[str, Path, dict]]:
    """Return {name: (kind, source, provenance)} of what `make run` imports: the real model and the demos."""
    seeds = {}
    try:
        seeds[bundled.VARIANT] = (bundled.KIND, bundled.require(), bundled.provenance())
    except bundled.BundledModelMissing as exc:
        say(f"{exc}; starting with the random-weight demos only")
    for name, kind in DEMO_VARIANTS.items():
        seeds[name] = (kind, demo_dir / name, {})
    return seeds


def ensure_demo_variants(demo_dir: Path, supervisor: Supervisor) -> None:
    """Import (through the worker) and deploy (through the web process) the real model and each demo variant."""
    seeds = seeded_variants(demo_dir)
    for name, (kind, source, provenance) in seeds.items():
        variant = ModelVariant.objects.filter(name=name).first()
        if variant is None or variant.status == VariantStatus.FAILED:
            say(f"importing {name} through the worker" + (" (converting its GGUF: a minute on a small CPU)"
                                                          if name == bundled.VARIANT else ""))
            variant = actions.do_start_import(name=name, kind=kind, source_path=str(source), actor=ACTOR,
                                              provenance=provenance)
    for name in seeds:
        variant = wait_until(lambda: ModelVariant.objects.exclude(status=VariantStatus.IMPORTING)
                             .filter(name=name).first(), supervisor, f"import of {name}")
        if variant.status not in (VariantStatus.READY, VariantStatus.DEPLOYED):
            say(f"{name} is {variant.status}: {variant.status_detail}")
            continue
        actions.do_deploy(variant, actor=ACTOR)
    for name in seeds:
        if not Deployment.objects.filter(variant__name=name).exists():
            continue  # its import failed (said above): nothing to wait for
        dep = wait_until(lambda: Deployment.objects.filter(
            variant__name=name, actual__in=[ActualState.DEPLOYED, ActualState.FAILED]).first(),
            supervisor, f"{name} to load")
        say(f"{name}: {dep.actual} on {dep.device or '-'} {dep.detail}")


def wait_until(predicate, supervisor: Supervisor, what: str, timeout: float = 300):
    """Return predicate()'s first true answer, restarting children that die meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        supervisor.check()
        result = predicate()
        if result:
            return result
        time.sleep(0.25)
    raise SystemExit(f"timed out waiting for {what}")


def stop(procs: dict) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        say(f"{name} stopped")


def interrupt(signum, frame):
    raise KeyboardInterrupt


def run(port: int) -> None:
    started = time.monotonic()
    # Stop cleanly on Ctrl-C and on a supervisor's SIGTERM alike.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    call_command("migrate", interactive=False, verbosity=0)
    # Shown the moment the admin exists: a later step (demo models, a full disk) may fail,
    # and a password never shown would lock the operator out.
    admin_line = ensure_admin()
    say(admin_line)
    # A signed checkpoint at every start: the ledger's state before this run adds to it
    # (beat then signs a heartbeat every few minutes).
    make_checkpoint("heartbeat")
    demo_dir = Path(settings.APPLIANCE_HOME) / "demo-models"
    call_command("make_demo_models", str(demo_dir))
    key = ensure_demo_key()
    # Before the web process starts, so waiting for "deployed" below waits
    # for this run's engines and not for rows a previous run left behind.
    actions.forget_loaded_state()
    supervisor = start_processes(port)
    # Ctrl-C reaches every process of the terminal's group; we wait for the
    # children to finish their own shutdown instead of dying first.
    try:
        ensure_demo_variants(demo_dir, supervisor)
        url = f"http://127.0.0.1:{port}"
        say(f"ready in {time.monotonic() - started:.1f}s")
        print(f"""
  console   {url}/admin/   — {admin_line}
  chat API  {url}/v1       — demo team key:
{key}

  try:  curl {url}/v1/chat/completions -H "Authorization: Bearer $(cat {Path(settings.APPLIANCE_HOME) / 'demo-api-key'})" \\
          -H 'Content-Type: application/json' \\
          -d '{{"model": "{bundled.VARIANT}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'
  ({bundled.VARIANT} is a real model, SmolLM2-135M-Instruct, {bundled.LICENSE}; the demo-* models have random weights:
   their answers are noise)
  Ctrl-C stops everything.
""", flush=True)
        while True:  # until Ctrl-C, or SystemExit from a child past its restart bound
            supervisor.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        say("stopping")
    finally:
        supervisor.stop()
