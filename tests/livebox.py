"""A real box for end-to-end and hostile tests: migrate, then a web process and a Celery worker on loopback.

Runs on whatever DATABASE_URL and CELERY_BROKER_URL say (embedded SQLite and
filesystem broker by default; PostgreSQL and Redis in CI), in its own
APPLIANCE_HOME, database and queue so it never touches another run's state.
"""
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# The web process's HTTP limits, as make run passes them (appliance/http_limits.py).
WEB_ARGS = ("--http", "appliance.http_limits:HeaderTimeoutProtocol", "--timeout-keep-alive", "5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Box:
    home: Path
    env: dict
    url: str
    demo_dir: Path
    procs: dict  # name -> subprocess.Popen: "web", "worker"

    def manage(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"manage.py {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def new_key(self, team: str = "e2e") -> str:
        return self.manage("create_api_key", "--team", team).stdout.strip().splitlines()[-1]


class PostgresDatabase:
    """A throwaway database on the server named by DATABASE_URL."""

    def __init__(self, url: str):
        import psycopg

        self.psycopg = psycopg
        self.admin_url = url
        self.name = f"appliance_e2e_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        base, _, _ = url.rpartition("/")
        self.url = f"{base}/{self.name}"

    def drop(self):
        with self.psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait_http(url: str, procs: dict, logs: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{(logs / f'{name}.log').read_text()[-3000:]}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def start_box(tmp_path_factory, **extra_env: str):
    """Start a box in a fresh APPLIANCE_HOME (extra_env added to its environment); yield it, then stop it."""
    home = tmp_path_factory.mktemp("appliance-home")
    env = {**os.environ, "APPLIANCE_HOME": str(home), "APPLIANCE_QUEUE": f"e2e-{uuid.uuid4().hex[:8]}",
           "PYTHONUNBUFFERED": "1", "APPLIANCE_RECONCILE_INTERVAL": "0.3", **extra_env}
    database = None
    if os.environ.get("DATABASE_URL", "").startswith("postgres"):
        database = PostgresDatabase(os.environ["DATABASE_URL"])
        env["DATABASE_URL"] = database.url
    procs: dict[str, subprocess.Popen] = {}
    try:
        port = free_port()
        box = Box(home=home, env=env, url=f"http://127.0.0.1:{port}", demo_dir=home / "demo-models",
                  procs=procs)
        box.manage("migrate", "--verbosity", "0")
        box.manage("make_demo_models", str(box.demo_dir))
        logs = home / "logs"
        logs.mkdir()
        procs["worker"] = start([sys.executable, "-m", "celery", "-A", "appliance", "worker", "-Q",
                                 env["APPLIANCE_QUEUE"], "-c", "1", "-l", "INFO", "--without-heartbeat",
                                 "--without-gossip", "--without-mingle"], env, logs / "worker.log")
        procs["web"] = start([sys.executable, "-m", "uvicorn", "appliance.asgi:application", "--host", "127.0.0.1",
                              "--port", str(port), "--lifespan", "off", *WEB_ARGS], env, logs / "web.log")
        wait_http(f"{box.url}/v1/models", procs, logs)
        yield box
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if database:
            database.drop()


@dataclass
class ConsoleAdmin:
    username: str
    password: str


def make_console_admin(box) -> ConsoleAdmin:
    """Create a superuser on the box, as an administrator would with createsuperuser."""
    admin = ConsoleAdmin("admin", "browser-test-" + uuid.uuid4().hex)
    box.manage("shell", "--no-imports", "-c",
               "from django.contrib.auth import get_user_model\n"
               f"get_user_model().objects.create_superuser({admin.username!r}, password={admin.password!r})")
    return admin
