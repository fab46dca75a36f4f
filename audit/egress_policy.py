"""The egress allowlist: parse it, and judge addresses and names against it.

Imports only the standard library (the guard is installed before anything else). The judging
functions take the policy as plain tuples of ints and strings (`Policy.rules()`), and read only
names captured here at import, so that the guard can run private copies of them which later
assignments to this module, to `socket`, `ipaddress` or the builtins do not reach.
"""
import _socket
import ipaddress
import os
import sys
import time
import types
from dataclasses import dataclass, field
from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.0/8", "::1/128")
# Names that never reach a resolver: the C library answers them from /etc/hosts.
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
# The custom audit event through which a refused change to the guard's modules is recorded.
TAMPER_EVENT = "audit.egress.tamper"

# Captured once, C functions all: the guard's copies call these, whatever `socket` or `time` hold later.
_inet_pton = _socket.inet_pton
_getaddrinfo = _socket.getaddrinfo  # the C function itself: socket.getaddrinfo is Python code
_monotonic = time.monotonic
_from_bytes = int.from_bytes
_audit = sys.audit
_FAMILIES = ((4, _socket.AF_INET), (6, _socket.AF_INET6))
_resolve_cache: dict = {}


@dataclass(frozen=True)
class Policy:
    """Where this process may connect: networks (any port) and named hosts (optionally one port)."""

    networks: tuple = ()
    hosts: types.MappingProxyType = field(default_factory=lambda: types.MappingProxyType({}))
    source: str = "default"

    def rules(self) -> tuple:
        """Return the policy as plain immutable tuples: (ranges, hosts, source, description)."""
        ranges = tuple((n.version, int(n.network_address), int(n.broadcast_address)) for n in self.networks)
        hosts = tuple((name, port, address_number(name)) for name, port in self.hosts.items())
        return ranges, hosts, self.source, tuple(self.describe())

    def allows_address(self, host: str, port: int | None) -> bool:
        """Return whether a connection to host (an IP literal) on port is allowed."""
        return judge_address(self.rules(), host, port)

    def allows_name(self, name: str, port: int | None) -> bool:
        """Return whether a lookup of name (for port) is allowed."""
        return judge_name(self.rules(), name, port)

    def describe(self) -> list[str]:
        """Return the allowlist as the strings an operator would write."""
        hosts = [h if p is None else f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.hosts.items()]
        return [str(n) for n in self.networks] + hosts


def address_number(host: str) -> tuple | None:
    """Return (IP version, address as an int) of an IP literal (a %scope dropped), or None for a name."""
    text = host.split("%", 1)[0]
    for version, family in _FAMILIES:
        try:
            return version, _from_bytes(_inet_pton(family, text), "big")
        except (OSError, ValueError):  # not this family; ValueError for embedded NULs
            pass
    return None


def judge_address(rules: tuple, host: str, port: int | None) -> bool:
    """Return whether rules allow a connection to host (an IP literal, else judged as a name) on port."""
    number = address_number(host)
    if number is None:
        return judge_name(rules, host, port)
    candidates = [number]
    if number[0] == 6 and number[1] >> 32 == 0xFFFF:  # ::ffff:a.b.c.d is a.b.c.d
        candidates.append((4, number[1] & 0xFFFFFFFF))
    ranges, hosts = rules[0], rules[1]
    for version, value in candidates:
        for range_version, low, high in ranges:
            if range_version == version and low <= value <= high:
                return True
        for _, allowed_port, literal in hosts:
            if literal == (version, value) and allowed_port in (None, port):
                return True
    for name, allowed_port, literal in hosts:
        if literal is None and allowed_port in (None, port):
            resolved = resolve(name)
            for candidate in candidates:
                if candidate in resolved:
                    return True
    return False


def judge_name(rules: tuple, name: str, port: int | None) -> bool:
    """Return whether rules allow a lookup of name (for port)."""
    name = name.rstrip(".").lower()
    if address_number(name) is not None:
        return judge_address(rules, name, port)
    if name in LOCAL_NAMES:
        return True
    for host, allowed_port, literal in rules[1]:
        if literal is None and host == name:
            return allowed_port is None or port in (None, allowed_port)
    return False


def resolve(name: str) -> frozenset:
    """Return the address numbers an allowed host name resolves to, cached for a minute."""
    cached = _resolve_cache.get(name)
    if cached and _monotonic() - cached[0] < 60:
        return cached[1]
    try:
        numbers = frozenset(address_number(info[4][0]) for info in _getaddrinfo(name, None))
    except OSError:
        numbers = frozenset()
    _resolve_cache[name] = (_monotonic(), numbers)
    return numbers


def parse_allowlist(entries, source: str) -> Policy:
    """Return the policy for CIDRs, addresses, hosts and host:port entries, naming a malformed entry."""
    networks, hosts = [], {}
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        host, port = _split_host_port(entry)
        host = host.lower()
        hosts[str(ipaddress.ip_address(host)) if address_number(host) else host] = port
    return Policy(tuple(networks), types.MappingProxyType(hosts), source)


def _split_host_port(entry: str) -> tuple[str, int | None]:
    """Return (host, port or None) of "host", "host:port" or "[v6]:port"."""
    try:
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            return host, int(rest[1:]) if rest.startswith(":") else None
        if entry.count(":") == 1:
            host, port = entry.split(":")
            return host, int(port)
    except ValueError:
        raise ValueError(f"egress allowlist entry {entry!r}: the port is not a number") from None
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


class SealedModule(types.ModuleType):
    """A guard module whose attributes cannot be assigned or deleted; each attempt is recorded."""

    def __setattr__(self, name, value):
        """Refuse the assignment and record it."""
        refuse_tampering(f"assignment to {self.__name__}.{name}")

    def __delattr__(self, name):
        """Refuse the deletion and record it."""
        refuse_tampering(f"deletion of {self.__name__}.{name}")


def refuse_tampering(what: str):
    """Record an attempt to change the guard (through the guard's own hook) and raise PermissionError."""
    _audit(TAMPER_EVENT, what)
    raise PermissionError(f"egress guard: {what} refused; the guard's state cannot be changed from outside it, "
                          f"and this attempt is recorded in the ledger")


sys.modules[__name__].__class__ = SealedModule
