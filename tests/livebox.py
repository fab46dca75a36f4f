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

from appliance.http_limits import SERVER_KEEPALIVE_S

ROOT = Path(__file__).resolve().parents[1]
# The web process's HTTP limits, as make run passes them (appliance/http_limits.py).
WEB_ARGS = ("--http", "appliance.http_limits:HeaderTimeoutProtocol", "--timeout-keep-alive", str(SERVER_KEEPALIVE_S))


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


def launch(tmp_path_factory, procs: dict, port: int | None = None, shared_with: Box | None = None,
           host: str = "127.0.0.1", **extra_env: str) -> Box:
    """Start a worker and a web process (into procs) in a fresh APPLIANCE_HOME; return the box without waiting for
    it to answer. Its database is migrated and demo models written first, unless it shares both with another box."""
    home = tmp_path_factory.mktemp("appliance-home")
    env = {**os.environ, "APPLIANCE_HOME": str(home), "APPLIANCE_QUEUE": f"e2e-{uuid.uuid4().hex[:8]}",
           "PYTHONUNBUFFERED": "1", "APPLIANCE_RECONCILE_INTERVAL": "0.3", **extra_env}
    port = port or free_port()
    demo_dir = shared_with.demo_dir if shared_with else home / "demo-models"
    box = Box(home=home, env=env, url=f"http://{host}:{port}", demo_dir=demo_dir, procs=procs)
    if shared_with is None:
        box.manage("migrate", "--verbosity", "0")
        box.manage("make_demo_models", str(box.demo_dir))
    logs = home / "logs"
    logs.mkdir()
    procs["worker"] = start([sys.executable, "-m", "celery", "-A", "appliance", "worker", "-Q",
                             env["APPLIANCE_QUEUE"], "-c", "1", "-l", "INFO", "--without-heartbeat",
                             "--without-gossip", "--without-mingle"], env, logs / "worker.log")
    procs["web"] = start([sys.executable, "-m", "uvicorn", "appliance.asgi:application", "--host", host,
                          "--port", str(port), "--lifespan", "off", *WEB_ARGS], env, logs / "web.log")
    return box


def stop(procs: dict) -> None:
    for proc in procs.values():
        proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def own_database_url() -> tuple[str | None, "PostgresDatabase | None"]:
    """Return the DATABASE_URL a new box gets (None: the default) and the throwaway database to drop after it."""
    if os.environ.get("DATABASE_URL", "").startswith("postgres"):
        database = PostgresDatabase(os.environ["DATABASE_URL"])
        return database.url, database
    return None, None


def start_box(tmp_path_factory, **extra_env: str):
    """Start a box in a fresh APPLIANCE_HOME (extra_env added to its environment); yield it, then stop it."""
    url, database = own_database_url()
    procs: dict[str, subprocess.Popen] = {}
    try:
        box = launch(tmp_path_factory, procs, **({"DATABASE_URL": url} if url else {}), **extra_env)
        wait_http(f"{box.url}/v1/models", procs, box.home / "logs")
        yield box
    finally:
        stop(procs)
        if database:
            database.drop()


def start_nodes(tmp_path_factory, count: int, *, shared_store: bool = True, **extra_env: str):
    """Start count boxes as the nodes node-1.. of one appliance: one database (a shared SQLite file by default), one
    KEK, one model store (or, without shared_store, each its own under its home), each its own APPLIANCE_HOME,
    queue, port and processes; yield them, then stop them."""
    import base64
    import secrets

    url, database = own_database_url()
    if url is None:
        url = f"sqlite:///{tmp_path_factory.mktemp('appliance-db') / 'appliance.sqlite3'}"
    shared = {"DATABASE_URL": url, "APPLIANCE_AUDIT_KEK": base64.b64encode(secrets.token_bytes(32)).decode()}
    if not os.environ.get("CELERY_BROKER_URL"):  # the embedded broker: one folder for the appliance, as one server
        shared["APPLIANCE_BROKER_DIR"] = str(tmp_path_factory.mktemp("broker"))
    if shared_store:  # as on boxes that share a file system: each node finds what another imported in place
        shared["APPLIANCE_MODEL_STORE"] = str(tmp_path_factory.mktemp("model-store"))
    boxes: list[Box] = []
    running: list[dict] = []
    try:
        for index in range(1, count + 1):
            # Node i listens on 127.0.0.i, as boxes have addresses of their own; each node's egress allowlist is
            # 127.0.0.1 (the database, the broker) and itself, so a call to another node passes only once the
            # node has added that node's host:port to it.
            port, procs, host = free_port(), {}, f"127.0.0.{index}"
            running.append(procs)
            boxes.append(launch(tmp_path_factory, procs, port, boxes[0] if boxes else None, host, **shared,
                                APPLIANCE_NODE=f"node-{index}", APPLIANCE_NODE_ADDRESS=f"http://{host}:{port}",
                                APPLIANCE_EGRESS_ALLOW=f"127.0.0.1,{host}", **extra_env))
        for box in boxes:  # started together, several boxes share the machine's cores: allow them longer
            wait_http(f"{box.url}/v1/models", box.procs, box.home / "logs", timeout=90 * count)
        yield boxes
    finally:
        for procs in running:
            stop(procs)
        if database:
            database.drop()


def read_stream(stream) -> tuple[str, object, str | None]:
    """Return (text, usage, finish_reason) of a streamed chat completion read with the official client."""
    pieces, usage, finish = [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), usage, finish


@dataclass
class ConsoleAdmin:
    username: str
    password: str


def make_console_admin(box, username: str = "admin") -> ConsoleAdmin:
    """Create a superuser on the box, as an administrator would with createsuperuser."""
    admin = ConsoleAdmin(username, "browser-test-" + uuid.uuid4().hex)
    box.manage("shell", "--no-imports", "-c",
               "from django.contrib.auth import get_user_model\n"
               f"get_user_model().objects.create_superuser({admin.username!r}, password={admin.password!r})")
    return admin


class ConsoleSession:
    """A staff member (created for it) signed in to a live box's console over HTTP."""

    def __init__(self, box):
        admin = make_console_admin(box, f"console-{uuid.uuid4().hex[:8]}")
        self.username = admin.username
        self.http = httpx.Client(base_url=box.url, timeout=60)
        self.http.get("/admin/login/")
        signed_in = self.post("/admin/login/?next=/admin/", {"username": admin.username, "password": admin.password})
        assert signed_in.status_code == 302, signed_in.text[:500]

    def post(self, url: str, data: dict) -> httpx.Response:
        return self.http.post(url, data={**data, "csrfmiddlewaretoken": self.http.cookies["csrftoken"]},
                              headers={"Referer": str(self.http.base_url) + url})
