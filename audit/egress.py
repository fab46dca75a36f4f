"""Keep appliance processes from talking to the outside world, and record every attempt.

Installed by `appliance/__init__.py` before anything else is imported, so it imports only the
standard library. A PEP 578 audit hook refuses connects, datagrams and name lookups aimed
outside the allowlist before any packet leaves. It is a tripwire and a source of evidence, not
a sandbox: native code calling libc directly, and child processes, do not pass through it; the
systemd units and nftables rules in deploy/ are the enforcement, and network attestations
catch what both miss.
"""
import ipaddress
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
LOOPBACK = ("127.0.0.0/8", "::1/128")
# Names that never reach a resolver: the C library answers them from /etc/hosts.
LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
WATCHED = {"socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
           "socket.gethostbyname", "socket.gethostbyaddr"}


def set_offline_environment() -> None:
    """Force the offline variables, overriding anything inherited from the shell."""
    os.environ.update(OFFLINE_ENVIRONMENT)


@dataclass
class Policy:
    """Where this process may connect: networks (any port) and named hosts (optionally one port)."""

    networks: list = field(default_factory=list)
    hosts: dict = field(default_factory=dict)  # lower-case name or address -> port, or None for any
    source: str = "default"

    def allows_address(self, host: str, port: int | None) -> bool:
        """Return whether a connection to host (an IP literal) on port is allowed."""
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return self.allows_name(host, port)
        if any(address in net for net in self.networks):
            return True
        if address.version == 6 and address.ipv4_mapped is not None:
            if self.allows_address(str(address.ipv4_mapped), port):
                return True
        literal = {h: p for h, p in self.hosts.items() if _is_address(h)}
        if str(address) in literal and literal[str(address)] in (None, port):
            return True
        for name, allowed_port in self.hosts.items():
            if name not in literal and allowed_port in (None, port) and str(address) in _resolved(name):
                return True
        return False

    def allows_name(self, name: str, port: int | None) -> bool:
        """Return whether a lookup of name (for port) is allowed."""
        name = name.rstrip(".").lower()
        try:
            ipaddress.ip_address(name.split("%", 1)[0])
        except ValueError:
            pass
        else:
            return self.allows_address(name, port)
        if name in LOCAL_NAMES:
            return True
        allowed = self.hosts.get(name, False)
        return allowed is None or (allowed is not False and port in (None, allowed))

    def describe(self) -> list[str]:
        """Return the allowlist as the strings an operator would write."""
        return [str(n) for n in self.networks] + [f"{h}:{p}" if p else h for h, p in self.hosts.items()]


def _is_address(text: str) -> bool:
    """Return whether text is an IP address literal."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def parse_allowlist(entries: list[str], source: str) -> Policy:
    """Return the policy for comma-separated CIDRs, addresses, hosts and host:port entries."""
    policy = Policy(source=source)
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        try:
            policy.networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        host, port = _split_host_port(entry)
        host = host.lower()
        policy.hosts[str(ipaddress.ip_address(host)) if _is_address(host) else host] = port
    return policy


def _split_host_port(entry: str) -> tuple[str, int | None]:
    """Return (host, port or None) of "host", "host:port" or "[v6]:port"."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, int(port)
    return entry, None


def policy_from_environment(environ=os.environ) -> Policy:
    """Return APPLIANCE_EGRESS_ALLOW's policy, or loopback plus the database and broker hosts."""
    explicit = environ.get("APPLIANCE_EGRESS_ALLOW")
    if explicit is not None:
        return parse_allowlist(explicit.split(","), "APPLIANCE_EGRESS_ALLOW")
    entries = list(LOOPBACK)
    for variable in ("DATABASE_URL", "CELERY_BROKER_URL"):
        for url in environ.get(variable, "").split(";"):  # kombu accepts failover lists
            parts = urlsplit(url.strip())
            if parts.hostname:
                port = parts.port
                host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
                entries.append(f"{host}:{port}" if port else host)
    return parse_allowlist(entries, "default (loopback, DATABASE_URL, CELERY_BROKER_URL)")


_resolve_cache: dict[str, tuple[float, set[str]]] = {}


def _resolved(name: str) -> set[str]:
    """Return the addresses an allowed host name resolves to, cached for a minute."""
    cached = _resolve_cache.get(name)
    if cached and time.monotonic() - cached[0] < 60:
        return cached[1]
    import socket

    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        addresses = set()
    _resolve_cache[name] = (time.monotonic(), addresses)
    return addresses


class Guard:
    """The installed hook's state: the policy in force and the refusals waiting to be recorded."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.installed = False
        self.pending: queue.Queue = queue.Queue()
        self.recorder: threading.Thread | None = None
        self.local = threading.local()

    def hook(self, event: str, args: tuple) -> None:
        """Refuse a watched socket operation whose destination the policy does not allow."""
        if event not in WATCHED or getattr(self.local, "busy", False):
            return
        self.local.busy = True  # resolving an allowed name below re-enters the hook
        try:
            destination = _destination(event, args)
            if destination is None:
                return
            host, port, lookup = destination
            allowed = (self.policy.allows_name if lookup else self.policy.allows_address)(host, port)
        finally:
            self.local.busy = False
        if not allowed:
            self._refuse(event, host, port)

    def _refuse(self, event: str, host: str, port: int | None) -> None:
        """Queue the evidence and raise the PermissionError that stops the operation."""
        target = f"{host}:{port}" if port is not None else host
        caller = _caller()
        self.pending.put({"operation": event, "destination": target, "caller": caller,
                          "process": _process_name(), "pid": os.getpid(), "allowlist": self.policy.source})
        self._start_recorder()
        raise PermissionError(f"egress refused: {event} to {target} is outside this appliance's allowlist "
                              f"({', '.join(self.policy.describe()) or 'nothing'}; from {caller})")

    def _start_recorder(self) -> None:
        """Start the thread that writes refusals to the ledger, once per process."""
        if self.recorder is None or not self.recorder.is_alive():
            self.recorder = threading.Thread(target=_record_forever, args=(self,), name="egress-recorder",
                                             daemon=True)
            self.recorder.start()


def _destination(event: str, args: tuple) -> tuple[str, int | None, bool] | None:
    """Return (host, port, is_lookup) for a watched event, or None when nothing leaves the box."""
    if event in ("socket.getaddrinfo",):
        host, port = args[0], args[1]
        if host is None:
            return None
        host = host.decode() if isinstance(host, bytes) else str(host)
        try:
            port = int(port) if port is not None else None
        except (TypeError, ValueError):
            port = None  # a service name such as "https": judged by host alone
        return host, port, True
    if event in ("socket.gethostbyname", "socket.gethostbyaddr"):
        return str(args[0]), None, True
    address = args[1] if len(args) > 1 else None
    if not isinstance(address, tuple) or not address:
        return None  # AF_UNIX paths, and sends on an already connected socket
    host = address[0].decode() if isinstance(address[0], bytes) else str(address[0])
    port = address[1] if len(address) > 1 and isinstance(address[1], int) else None
    return host, port, False


def _caller() -> str:
    """Return module:line of the innermost frame outside the socket machinery and this module."""
    frame = sys._getframe(1)
    skip = {"socket", "ssl", "selectors", "audit.egress", "asyncio.base_events", "asyncio.selector_events"}
    while frame is not None and frame.f_globals.get("__name__") in skip:
        frame = frame.f_back
    if frame is None:
        return "unknown"
    return f"{frame.f_globals.get('__name__', '?')}:{frame.f_lineno}"


def _process_name() -> str:
    """Return a short name of this process: the program and its first argument."""
    argv = [os.path.basename(a) for a in sys.argv[:3] if a]
    return " ".join(a for a in argv if not a.startswith("-")) or sys.executable


def _record_forever(guard: Guard) -> None:
    """Append each queued refusal to the ledger once Django is ready, in this thread's connection."""
    while True:
        details = guard.pending.get()
        try:
            _record(details)
        except Exception as exc:  # the refusal already happened; losing its record must not crash us
            print(f"egress guard: could not record {details}: {exc!r}", file=sys.stderr)
        finally:
            guard.pending.task_done()


def _record(details: dict) -> None:
    """Append one egress.blocked event, waiting for Django's apps to be ready."""
    from django.apps import apps

    deadline = time.monotonic() + 600
    while not apps.ready:
        if time.monotonic() > deadline:
            raise RuntimeError("Django never finished starting")
        time.sleep(0.2)
    from django.db import connections

    from audit.ledger import append

    try:
        append("egress.blocked", actor=f"system:{details['process']}"[:200], target=details["destination"],
               outcome="refused", details=details)
    finally:
        connections.close_all()


_guard: Guard | None = None


def install_guard(environ=os.environ) -> Guard:
    """Install the audit hook once per process (hooks cannot be removed) and return its state."""
    global _guard
    if _guard is None:
        _guard = Guard(policy_from_environment(environ))
        sys.addaudithook(_guard.hook)
        _guard.installed = True
    return _guard


def guard() -> Guard | None:
    """Return the installed guard, or None before install_guard()."""
    return _guard


def flush(timeout: float = 10.0) -> bool:
    """Wait until queued refusals are in the ledger; return whether that happened in time."""
    if _guard is None:
        return True
    deadline = time.monotonic() + timeout
    while _guard.pending.unfinished_tasks:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def startup_report() -> dict:
    """Return the guard's state and the offline values the Hugging Face libraries actually read."""
    report = {"guard_installed": bool(_guard and _guard.installed),
              "allowlist": _guard.policy.describe() if _guard else [],
              "environment": {k: os.environ.get(k) for k in OFFLINE_ENVIRONMENT}}
    read = {}
    # Only libraries already imported: importing transformers here would cost seconds per call.
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is None and "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as constants
    if constants is not None:
        for name in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
            if hasattr(constants, name):
                read[f"huggingface_hub.{name}"] = bool(getattr(constants, name))
    hub = sys.modules.get("transformers.utils.hub")
    if hub is not None and hasattr(hub, "is_offline_mode"):
        read["transformers.is_offline_mode()"] = bool(hub.is_offline_mode())
    report["libraries_read"] = read
    return report
