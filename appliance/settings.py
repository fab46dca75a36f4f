"""Settings for the appliance, read from the environment in one place.

Defaults make a fresh checkout work with no server: SQLite (WAL) and a
filesystem Celery broker, all under APPLIANCE_HOME (default ./var).
Production sets DATABASE_URL and CELERY_BROKER_URL.
"""
import os
import secrets
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


def env_bool(name: str, default: bool = False) -> bool:
    """Read a yes/no variable; a value that is neither (a typo such as "ture") stops the process, naming it."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    word = value.strip().lower()
    if word not in TRUE_WORDS | FALSE_WORDS:
        raise ValueError(f"{name} must be one of {sorted(TRUE_WORDS)} or {sorted(FALSE_WORDS)}, not {value!r}")
    return word in TRUE_WORDS


def env_int(name: str, default: int) -> int:
    """Read a whole-number variable; anything else stops the process, naming the variable."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {value!r}") from None


def env_float(name: str, default: float) -> float:
    """Read a number variable; anything else (nan included) stops the process, naming the variable."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number != number:
        raise ValueError(f"{name} must be a number, not {value!r}")
    return number


def env_secret(name: str, default: str = "") -> str:
    """Read NAME, or the contents of the file named by NAME_FILE."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        return Path(path).read_text().strip()
    return os.environ.get(name, default)


APPLIANCE_HOME = Path(env_str("APPLIANCE_HOME", str(BASE_DIR / "var"))).resolve()
APPLIANCE_HOME.mkdir(parents=True, exist_ok=True)
# The variants' files. Nodes of one appliance that share a file system may share the store, so that every node can
# load what any node imported (they never copy weights between them yet).
MODEL_STORE = Path(env_str("APPLIANCE_MODEL_STORE", str(APPLIANCE_HOME / "models"))).resolve()
EXPORT_DIR = APPLIANCE_HOME / "exports"


def _local_secret_key() -> str:
    """Return a per-box secret kept in a 0600 file, created on first use."""
    path = APPLIANCE_HOME / "secret_key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = env_secret("DJANGO_SECRET_KEY") or _local_secret_key()
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = [h for h in env_str("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]").split(",") if h]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "audit",
    "appliance",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "appliance.urls"
ASGI_APPLICATION = "appliance.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL")
# IMMEDIATE takes the write lock at BEGIN, so concurrent writers (web, worker, beat, and the nodes of an
# appliance sharing one file) queue on busy_timeout instead of failing with "database is locked" when a read
# lock cannot be upgraded.
SQLITE_OPTIONS = {
    "transaction_mode": "IMMEDIATE",
    "timeout": 30,
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
}
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}
    if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
        DATABASES["default"]["OPTIONS"] = dict(SQLITE_OPTIONS)
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": APPLIANCE_HOME / "db.sqlite3",
            "OPTIONS": dict(SQLITE_OPTIONS),
            "TEST": {"NAME": APPLIANCE_HOME / "test-db.sqlite3"},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = APPLIANCE_HOME / "static"

# Celery: the embedded default is kombu's filesystem transport, so `make run`
# needs no broker server. Tasks carry ids only and reload rows in the worker.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://localhost//")
# The embedded broker's folder; nodes of one appliance on one file system may share it as they would a broker server.
BROKER_DIR = Path(env_str("APPLIANCE_BROKER_DIR", str(APPLIANCE_HOME / "broker"))).resolve()
if CELERY_BROKER_URL.startswith("filesystem://"):
    for sub in ("queue", "processed", "control", "unreadable"):
        (BROKER_DIR / sub).mkdir(parents=True, exist_ok=True)
    # kombu's filesystem transport with its races closed (see appliance/broker_transport.py).
    CELERY_BROKER_TRANSPORT = "appliance.broker_transport:Transport"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        # Broadcast (remote control) messages; kombu's default is ./control in the working directory.
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
        # Message files that cannot be decoded are kept here, out of every queue, for an administrator.
        "unreadable_folder": str(BROKER_DIR / "unreadable"),
    }
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_BEAT_SCHEDULE_FILENAME = str(APPLIANCE_HOME / "celerybeat-schedule")

# The engine: which device the web process puts weights on ("auto" picks CUDA
# when present), and how often it reconciles deployments with the registry.
ENGINE_DEVICE = env_str("APPLIANCE_DEVICE", "auto")
RECONCILE_INTERVAL_S = env_float("APPLIANCE_RECONCILE_INTERVAL", 1.0)
ENGINE_QUEUE_LIMIT = env_int("APPLIANCE_QUEUE_LIMIT", 64)
# KV-cache memory each deployment may hold; requests wait for room rather than run the box
# out of memory. Unset: a quarter of free RAM on CPU, 85% of free GPU memory.
_kv_budget_mb = env_int("APPLIANCE_KV_BUDGET_MB", 0)
ENGINE_KV_BUDGET_BYTES = _kv_budget_mb * 1024 * 1024 or None
# torch intra-op threads of each engine process on CPU. Unset (0): the engine's default, half the cores, which
# leaves the rest to the web process's event loop that serves HTTP.
ENGINE_THREADS = env_int("APPLIANCE_ENGINE_THREADS", 0) or None
# Bit-exact batching, an opt-in mode on every device: each request's numbers equal running it alone (see
# inference/engine/exact.py), at about 1.4x the cost of a plain batched step. Off (the default): plain batched
# products; greedy answers then match unbatched generate except where the last bits flip a near-tie.
_engine_exact = env_str("APPLIANCE_ENGINE_EXACT", "off").strip().lower()
if _engine_exact not in ("on", "off"):
    raise ValueError(f"APPLIANCE_ENGINE_EXACT must be on or off, not {_engine_exact!r}")
ENGINE_EXACT = _engine_exact == "on"
# Weights' number format: auto (bfloat16 on GPUs, and on CPUs that compute it natively, AVX512-BF16 or AMX,
# for models of 128 MiB of weights or more; else float32, and float32 on CPU in exact mode), float32,
# bfloat16, or int8 (weight-only, CPU kernels).
ENGINE_PRECISION = env_str("APPLIANCE_ENGINE_PRECISION", "auto").strip().lower()
if ENGINE_PRECISION not in ("auto", "float32", "bfloat16", "int8"):
    raise ValueError(f"APPLIANCE_ENGINE_PRECISION must be auto, float32, bfloat16 or int8, not {ENGINE_PRECISION!r}")
if ENGINE_PRECISION == "int8" and ENGINE_EXACT:
    raise ValueError("APPLIANCE_ENGINE_PRECISION=int8 cannot run with APPLIANCE_ENGINE_EXACT=on")

# External engines (a deployment's `engine`, appliance/engines.py): the Python interpreter of the virtualenv each
# one is installed in (it pins its own torch and transformers). Empty: that engine is not installed on this box.
VLLM_PYTHON = env_str("APPLIANCE_VLLM_PYTHON", "")
SGLANG_PYTHON = env_str("APPLIANCE_SGLANG_PYTHON", "")
# Seconds an external engine may take to answer its /health after start (vLLM's CPU build takes about a minute).
EXTERNAL_ENGINE_READY_S = env_float("APPLIANCE_EXTERNAL_ENGINE_READY_S", 600.0)
# Seconds a running external engine may go without its /health answering 200 before it is killed as hung (and
# restarted, as a crashed one is).
ENGINE_HUNG_AFTER_S = env_float("APPLIANCE_ENGINE_HUNG_AFTER_S", 60.0)
if ENGINE_HUNG_AFTER_S <= 0:
    raise ValueError(f"APPLIANCE_ENGINE_HUNG_AFTER_S must be a number of seconds above 0, not {ENGINE_HUNG_AFTER_S!r}")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("APPLIANCE_LOG_LEVEL", "INFO")},
    # httpx logs every request at INFO: one line per chat request passed to a vLLM engine.
    "loggers": {"httpx": {"level": "WARNING"}},
}

# The team API (appliance/api/) asks the registry about keys and variants through this.
API_GATEKEEPER = "appliance.api.admission.RegistryGatekeeper"
# Request limits of the web process (appliance/http_limits.py): the largest body (413 beyond), and how long a
# client may take to send its headers and its body (a slow-loris drip is cut after that).
API_MAX_BODY_BYTES = env_int("APPLIANCE_MAX_BODY_BYTES", 1024 * 1024)
HTTP_HEADER_TIMEOUT_S = env_int("APPLIANCE_HEADER_TIMEOUT_S", 10)
HTTP_BODY_TIMEOUT_S = env_int("APPLIANCE_BODY_TIMEOUT_S", 30)

# The fit advisor analyses each imported variant for this box's own inventory, or for a
# planning spec such as "8xH20" or "cpu:512G", at this context length.
FIT_HARDWARE = env_str("APPLIANCE_FIT_HARDWARE")
FIT_CONTEXT = env_int("APPLIANCE_FIT_CONTEXT", 4096)
# Longest a fit analysis may run: it runs in a child process that the worker kills after this many
# seconds, or as soon as its variant is deleted.
FIT_TIMEOUT_S = env_int("APPLIANCE_FIT_TIMEOUT_S", 300)

# Each box (node) consumes its own queue, so several boxes can share a broker.
CELERY_TASK_DEFAULT_QUEUE = env_str("APPLIANCE_QUEUE", "appliance")

# --- Nodes: boxes sharing one database and one broker form one appliance ---
import socket as _socket  # noqa: E402

from appliance.names import check_name, check_node_address, default_node_name  # noqa: E402

# This box's name in the appliance (the Node row, the node in every ledger event) and the address other nodes
# reach its web process on.
APPLIANCE_NODE = check_name(env_str("APPLIANCE_NODE") or default_node_name(_socket.gethostname()),
                            field="APPLIANCE_NODE")
APPLIANCE_NODE_ADDRESS = check_node_address(
    env_str("APPLIANCE_NODE_ADDRESS") or f"http://127.0.0.1:{env_int('APPLIANCE_PORT', 8000)}",
    field="APPLIANCE_NODE_ADDRESS")
# The other nodes and the administrators reach this box's console and API at its node address.
_node_host = APPLIANCE_NODE_ADDRESS.split("//", 1)[1].rsplit(":", 1)[0]
if _node_host not in ALLOWED_HOSTS:
    ALLOWED_HOSTS.append(_node_host)
# The web process refreshes its Node row this often; a node silent for NODE_STALE_AFTER heartbeats shows as
# stale, for NODE_DOWN_AFTER heartbeats as down.
NODE_HEARTBEAT_S = env_float("APPLIANCE_NODE_HEARTBEAT_S", 2.0)
NODE_STALE_AFTER = 3
NODE_DOWN_AFTER = 5
# Beat may run on every node; only the holder of the beat lease sends the periodic jobs (appliance.beat). A beat
# that dies hands over once its lease expires; ticks come at least every third of it, to renew in time.
BEAT_LEASE_S = env_int("APPLIANCE_BEAT_LEASE_S", 30)
CELERY_BEAT_SCHEDULER = "appliance.beat:LeaderScheduler"
CELERY_BEAT_MAX_LOOP_INTERVAL = BEAT_LEASE_S / 3

# Beat: re-hash the model store daily, so files altered on disk are quarantined
# even when nobody redeploys them.
CELERY_BEAT_SCHEDULE = {
    "verify-model-store": {"task": "appliance.tasks.verify_all_variants", "schedule": 24 * 3600.0},
}
# An import renews its lease as it copies; one not renewed for this long had its worker die, and beat
# marks it failed (appliance.actions.do_reclaim_stale_imports) within another half of it.
IMPORT_LEASE_S = env_int("APPLIANCE_IMPORT_LEASE_S", 30)
# Longest a GGUF conversion (a child process of the worker) may run before it is killed and the import failed.
GGUF_TIMEOUT_S = env_int("APPLIANCE_GGUF_TIMEOUT_S", 1800)
# Where `import_model --from-ollama` looks for Ollama's models directory (manifests/ and blobs/).
OLLAMA_MODELS = env_str("OLLAMA_MODELS")
CELERY_BEAT_SCHEDULE["reclaim-stale-imports"] = {"task": "appliance.tasks.reclaim_stale_imports",
                                                 "schedule": IMPORT_LEASE_S / 2}

# --- Audit and evidence ---
import socket  # noqa: E402  (kept inside this section, which audit/ owns)

# The key-encryption key (32 bytes, base64) that protects the checkpoint signing key, keys the
# ledger's text digests and wraps the teams' transcript keys. Without it, a 0600 file under
# APPLIANCE_HOME is created on first use; boxes sharing a database must share the KEK.
AUDIT_KEK = env_secret("APPLIANCE_AUDIT_KEK")
AUDIT_KEK_FILE = APPLIANCE_HOME / "audit_kek"
# Fingerprints of the keys this box created: live verification trusts this file, not the database.
AUDIT_PUBKEY_PIN_FILE = APPLIANCE_HOME / "audit_pubkey_fingerprints"
# The first line of every checkpoint; fixed into the signing key when it is created.
AUDIT_ORIGIN = env_str("APPLIANCE_AUDIT_ORIGIN", f"{socket.gethostname()}/llm-appliance/audit")
# Beat signs a checkpoint this often even when nothing happened, so a cut-off tail shows as a
# missing heartbeat; verifiers allow AUDIT_MAX_GAP_S between checkpoints (downtime shows too).
AUDIT_HEARTBEAT_S = env_int("APPLIANCE_AUDIT_HEARTBEAT", 300)
AUDIT_MAX_GAP_S = env_int("APPLIANCE_AUDIT_MAX_GAP", 3 * AUDIT_HEARTBEAT_S)
AUDIT_ATTESTATION_S = env_int("APPLIANCE_AUDIT_ATTESTATION", 60)  # also at each process start
AUDIT_TRANSCRIPT_RETENTION_DAYS = env_int("APPLIANCE_TRANSCRIPT_RETENTION_DAYS", 30)
AUDIT_EXPORT_DIR = EXPORT_DIR
# Every ledger event names the node that wrote it (audit.ledger).
AUDIT_NODE = APPLIANCE_NODE
CELERY_BEAT_SCHEDULE.update({
    "audit-heartbeat-checkpoint": {"task": "audit.tasks.heartbeat_checkpoint",
                                   "schedule": float(AUDIT_HEARTBEAT_S)},
    "audit-network-attestation": {"task": "audit.tasks.network_attestation",
                                  "schedule": float(AUDIT_ATTESTATION_S)},
    "audit-transcript-retention": {"task": "audit.tasks.purge_expired_transcripts", "schedule": 3600.0},
})

# --- Teams, limits and console ---
# Production mode (APPLIANCE_PRODUCTION=1): HTTPS-only cookies, HSTS, no DEBUG, and staff
# must replace any password they did not choose in the console (such as the one `make run`
# prints) before they can use it. `manage.py check --deploy` passes in this mode.
APPLIANCE_PRODUCTION = env_bool("APPLIANCE_PRODUCTION", False)
if APPLIANCE_PRODUCTION:
    DEBUG = False
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("APPLIANCE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = env_int("APPLIANCE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("APPLIANCE_HSTS_SUBDOMAINS", True)
    # A box on a company network is never on the browsers' public HSTS preload list.
    SILENCED_SYSTEM_CHECKS = ["security.W021"]
    if env_bool("APPLIANCE_BEHIND_PROXY", False):
        # Only behind a TLS-terminating proxy that sets this header and strips it from clients.
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    CSRF_TRUSTED_ORIGINS = [o for o in env_str("CSRF_TRUSTED_ORIGINS").split(",") if o]
SESSION_COOKIE_AGE = env_int("APPLIANCE_SESSION_AGE_S", 8 * 3600)
MIDDLEWARE.append("appliance.console.security.PasswordChangeRequiredMiddleware")

# Console sign-in throttling, counted in the database so every web process shares it.
CONSOLE_LOGIN_MAX_FAILURES = env_int("APPLIANCE_LOGIN_MAX_FAILURES", 5)  # per user name
CONSOLE_LOGIN_MAX_FAILURES_PER_ADDRESS = env_int("APPLIANCE_LOGIN_MAX_FAILURES_PER_ADDRESS", 20)
CONSOLE_LOGIN_WINDOW_S = env_int("APPLIANCE_LOGIN_WINDOW_S", 900)

# The staff chat page's keys: short-lived, one live key per user.
CONSOLE_CHAT_KEY_TTL_S = env_int("APPLIANCE_CONSOLE_KEY_TTL_S", 900)

# /metrics: open to these networks, or to anyone presenting the token as a bearer.
METRICS_ALLOW = [n.strip() for n in env_str("APPLIANCE_METRICS_ALLOW", "127.0.0.1/32,::1/128").split(",")
                 if n.strip()]
METRICS_TOKEN = env_secret("APPLIANCE_METRICS_TOKEN")

# Raw usage records roll up per hour and day; finished days are pruned after their roll-up.
CELERY_BEAT_SCHEDULE.update({
    "roll-up-usage": {"task": "appliance.tasks.roll_up_usage", "schedule": 300.0},
})
