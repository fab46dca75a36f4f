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

from . import actions
from .models import ActualState, Deployment, ModelVariant, Team, VariantStatus

ACTOR = "system:launcher"
DEMO_VARIANTS = {"demo-moe": "moe", "demo-distilled": "distilled", "demo-dense": "dense"}
DEMO_TEAM = "demo"


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


def start_processes(port: int) -> dict[str, subprocess.Popen]:
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
                "--timeout-keep-alive", "5"],
    }
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    procs = {}
    for name, cmd in commands.items():
        log = (logs / f"{name}.log").open("ab")
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=settings.BASE_DIR)
        say(f"{name} started (pid {procs[name].pid}, log {logs / f'{name}.log'})")
    return procs


def ensure_demo_variants(demo_dir: Path, procs: dict) -> None:
    """Import (through the worker) and deploy (through the web process) each demo variant."""
    for name, kind in DEMO_VARIANTS.items():
        variant = ModelVariant.objects.filter(name=name).first()
        if variant is None or variant.status == VariantStatus.FAILED:
            say(f"importing {name} through the worker")
            variant = actions.do_start_import(name=name, kind=kind, source_path=str(demo_dir / name), actor=ACTOR)
    for name in DEMO_VARIANTS:
        variant = wait_until(lambda: ModelVariant.objects.exclude(status=VariantStatus.IMPORTING)
                             .filter(name=name).first(), procs, f"import of {name}")
        if variant.status not in (VariantStatus.READY, VariantStatus.DEPLOYED):
            say(f"{name} is {variant.status}: {variant.status_detail}")
            continue
        actions.do_deploy(variant, actor=ACTOR)
    for name in DEMO_VARIANTS:
        dep = wait_until(lambda: Deployment.objects.filter(
            variant__name=name, actual__in=[ActualState.DEPLOYED, ActualState.FAILED]).first(),
            procs, f"{name} to load")
        say(f"{name}: {dep.actual} on {dep.device or '-'} {dep.detail}")


def wait_until(predicate, procs: dict, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode} while waiting for {what}; see var/logs")
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
    # A signed checkpoint at every start: the ledger's state before this run adds to it
    # (beat then signs a heartbeat every few minutes).
    make_checkpoint("heartbeat")
    demo_dir = Path(settings.APPLIANCE_HOME) / "demo-models"
    call_command("make_demo_models", str(demo_dir))
    admin_line = ensure_admin()
    key = ensure_demo_key()
    # Before the web process starts, so waiting for "deployed" below waits
    # for this run's engines and not for rows a previous run left behind.
    actions.forget_loaded_state()
    procs = start_processes(port)
    # Ctrl-C reaches every process of the terminal's group; we wait for the
    # children to finish their own shutdown instead of dying first.
    try:
        ensure_demo_variants(demo_dir, procs)
        url = f"http://127.0.0.1:{port}"
        say(f"ready in {time.monotonic() - started:.1f}s")
        print(f"""
  console   {url}/admin/   — {admin_line}
  chat API  {url}/v1       — demo team key:
{key}

  try:  curl {url}/v1/chat/completions -H "Authorization: Bearer $(cat {Path(settings.APPLIANCE_HOME) / 'demo-api-key'})" \\
          -H 'Content-Type: application/json' -d '{{"model": "demo-dense", "messages": [{{"role": "user", "content": "hello"}}]}}'
  (the demo models have random weights: their answers are noise)
  Ctrl-C stops everything.
""", flush=True)
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        for name, proc in procs.items():
            if proc.poll() is not None:
                say(f"{name} exited with {proc.returncode}; stopping the others")
    except KeyboardInterrupt:
        say("stopping")
    finally:
        stop(procs)
