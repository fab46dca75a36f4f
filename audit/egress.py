"""Keep appliance processes from talking to the outside world, and record every attempt.

Installed by `appliance/__init__.py` before anything else is imported, so it imports only the
standard library. A PEP 578 audit hook refuses connects, datagrams and name lookups aimed
outside the allowlist before any packet leaves, and records each refusal in the ledger.

It cannot be switched off quietly from Python. The hook runs private copies of this module's and
audit.egress_policy's functions, against a private namespace (policy, queue of records, a snapshot
of the builtins) made at install and reachable from no module, and calls only C functions captured
at import, so assigning to this module, to `socket`, `queue`, `ipaddress`, the builtins, `Policy` or
`guard()` changes nothing it reads. What it does see is refused or recorded:
- refused and recorded (`egress.tamper`): assigning to or deleting from either guard module or
  `guard()`, replacing the code or defaults of a guard function ("object.__setattr__"), and adding
  another audit hook after it (one could watch the guard's frames);
- recorded (`egress.policy_changed`): `set_policy`, the one way to change the policy;
- recorded once per calling place (`egress.introspection`): the ways to reach the private namespace,
  `gc.get_objects` / `get_referrers` / `get_referents`, `sys.settrace` / `setprofile`,
  `sys._current_frames`, and reading the frames of a traceback that passed through the hook.
Audit hooks cannot be removed.

What Python code can still do without a trace: write through ctypes into memory; run a signal
handler that lands while the hook runs and reads its frame through `sys._getframe` (called too
widely to record); use what the recorded ways above reach; rebind `vars(module)` entries or unseal a
module with `object.__setattr__` (the hook reads neither); replace `audit.ledger` so that records are
lost (refusals still happen). And the hook never sees native code calling libc directly (database
drivers, CUDA, anything loaded with ctypes) nor child processes that do not import the appliance.
It is a tripwire and a source of evidence, not a sandbox: the systemd units and nftables rules in
deploy/ are what stop those, and network attestations (audit.attestation) catch connections held by
the appliance's processes and their children whichever way they were opened.
"""
import _thread
import builtins
import collections
import os
import sys
import time
import types

from audit import egress_policy
from audit.egress_policy import (  # noqa: F401  (re-exported: the guard's public names)
    LOCAL_NAMES, LOOPBACK, TAMPER_EVENT, Policy, judge_address, judge_name, parse_allowlist,
    policy_from_environment, refuse_tampering)

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
WATCHED = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                     "socket.gethostbyname", "socket.gethostbyaddr"})
# The guard's own audit events: the only ways in to the hook's private state.
SET_POLICY_EVENT = "audit.egress.set_policy"
QUERY_EVENT = "audit.egress.query"
JUDGE_EVENT = "audit.egress.judge"
INTROSPECTION = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace",
                           "sys.setprofile", "sys._current_frames"})
_HANDLED = WATCHED | INTROSPECTION | {SET_POLICY_EVENT, QUERY_EVENT, JUDGE_EVENT, TAMPER_EVENT,
                                      "object.__setattr__", "object.__getattr__", "sys.addaudithook"}
_GUARD_MODULES = frozenset({__name__, egress_policy.__name__})
# Captured at import, before anything else can replace them.
_audit = sys.audit
_getframe = sys._getframe
_getpid = os.getpid
_FunctionType = types.FunctionType
_start_thread = _thread.start_new_thread
_sleep = time.sleep

# The installed hook's private namespace holds the real values of these; here they stay empty.
_rules: tuple = ((), (), "none", ())
_pending: collections.deque = collections.deque()
_local = None
_seen: set = set()
_recorder_pid = 0
_privates: tuple = ()  # id() of the hook's private namespaces


class HookRefused(RuntimeError):
    """Raised to stop another audit hook being added (CPython then drops the hook and this error)."""


def set_offline_environment() -> None:
    """Force the offline variables, overriding anything inherited from the shell."""
    os.environ.update(OFFLINE_ENVIRONMENT)


def _hook(event: str, args: tuple) -> None:
    """Judge one audit event: refuse egress outside the policy, and refuse or record changes to the guard."""
    if event not in _HANDLED:
        return
    if event in WATCHED:
        _judge_socket(event, args)
    elif event == "object.__setattr__":
        _judge_setattr(args)
    elif event == "object.__getattr__":
        _watch_traceback(args)
    elif event == QUERY_EVENT:
        args[0].append((_rules, len(_pending)))
    elif event == JUDGE_EVENT:
        args[2].append(judge_address(_rules, args[0], args[1]))
    elif event == SET_POLICY_EVENT:
        _change_policy(args[0])
    elif event == TAMPER_EVENT:
        _queue("egress.tamper", "audit.egress", "refused", {"what": str(args[0])[:300]})
    elif event == "sys.addaudithook":
        _queue("egress.tamper", "audit.egress", "refused", {"what": "adding another audit hook"})
        raise HookRefused("egress guard: no audit hook may be added after it (recorded in the ledger)")
    else:
        _introspected(event)


def _judge_socket(event: str, args: tuple) -> None:
    """Refuse a watched socket operation whose destination the policy does not allow."""
    if getattr(_local, "busy", False):
        return
    _local.busy = True  # resolving an allowed name below re-enters the hook
    try:
        destination = _destination(event, args)
        if destination is None:
            return
        host, port, lookup = destination
        allowed = (judge_name if lookup else judge_address)(_rules, host, port)
    finally:
        _local.busy = False
    if not allowed:
        target = f"{host}:{port}" if port is not None else host
        caller = _queue("egress.blocked", target, "refused", {"operation": event, "destination": target})
        raise PermissionError(f"egress refused: {event} to {target} is outside this appliance's allowlist "
                              f"({', '.join(_rules[3]) or 'nothing'}; from {caller})")


def _judge_setattr(args: tuple) -> None:
    """Refuse replacing the code, defaults or special attributes of the guard's functions and classes."""
    target, name = args[0], args[1]
    if type(target) is not _FunctionType and type(target) is not type:
        return
    module = getattr(target, "__module__", None)  # a type being built may have none yet
    if type(module) is not str or module not in _GUARD_MODULES:
        return
    what = f"setting {name} of {module}.{getattr(target, '__qualname__', '?')}"
    _queue("egress.tamper", "audit.egress", "refused", {"what": what})
    raise PermissionError(f"egress guard: {what} refused (recorded in the ledger)")


def _watch_traceback(args: tuple) -> None:
    """Record reading the frame of a traceback entry that belongs to the hook (it leads to its namespace)."""
    if args[1] != "tb_frame" or getattr(_local, "busy", False):
        return
    _local.busy = True  # reading tb_frame below raises this event again
    try:
        ours = id(args[0].tb_frame.f_globals) in _privates
    finally:
        _local.busy = False
    if ours:
        _introspected("traceback.tb_frame")


def _change_policy(rules: tuple) -> None:
    """Replace the policy with a checked copy of rules, recording the change."""
    global _rules
    new = _frozen_rules(rules)
    _queue("egress.policy_changed", "allowlist", "ok", {"from": list(_rules[3]), "to": list(new[3]),
                                                         "source": new[2]})
    _rules = new


def _frozen_rules(rules: tuple) -> tuple:
    """Return rules rebuilt from exact ints and strings, so that no mutable look-alike reaches the hook."""
    ranges, hosts, source, description = rules
    frozen_ranges = tuple((_exact(v, int), _exact(low, int), _exact(high, int)) for v, low, high in ranges)
    frozen_hosts = tuple((_exact(name, str), None if port is None else _exact(port, int),
                          None if literal is None else (_exact(literal[0], int), _exact(literal[1], int)))
                         for name, port, literal in hosts)
    return frozen_ranges, frozen_hosts, _exact(source, str), tuple(_exact(d, str) for d in description)


def _exact(value, kind):
    """Return value if its type is exactly kind, else raise TypeError."""
    if type(value) is not kind:
        raise TypeError(f"egress policy: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _introspected(event: str) -> None:
    """Record, once per calling place, a call that can reach the hook's private state (gc, tracers, frames)."""
    caller = _caller()
    if (event, caller) not in _seen:
        _seen.add((event, caller))
        _queue("egress.introspection", event, "observed", {})


def _queue(action: str, target: str, outcome: str, details: dict) -> str:
    """Queue one event for the recorder thread and return the calling place."""
    caller = _caller()
    _pending.append((action, target, outcome, {**details, "caller": caller, "process": _process_name(),
                                               "pid": _getpid(), "allowlist": _rules[2]}))
    global _recorder_pid
    if _recorder_pid != _getpid():  # once per process (a forked child has no recorder thread)
        _recorder_pid = _getpid()
        _start_thread(_record_forever, (_pending,))
    return caller


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
    """Return module:line of the innermost frame outside the socket machinery and the guard."""
    frame = _getframe(1)
    skip = {"socket", "ssl", "selectors", "asyncio.base_events", "asyncio.selector_events", *_GUARD_MODULES}
    while frame is not None and frame.f_globals.get("__name__") in skip:
        frame = frame.f_back
    if frame is None:
        return "unknown"
    return f"{frame.f_globals.get('__name__', '?')}:{frame.f_lineno}"


def _process_name() -> str:
    """Return a short name of this process: the program and its first argument."""
    argv = [a.rsplit("/", 1)[-1] for a in sys.argv[:3] if a]
    return " ".join(a for a in argv if not a.startswith("-")) or sys.executable


def _record_forever(pending: collections.deque) -> None:
    """Append each queued event to the ledger once Django is ready, in this thread's connection."""
    while True:
        if not pending:
            _sleep(0.05)
            continue
        item = pending[0]  # removed only once recorded, so flush() waits for it
        try:
            _record(*item)
        except Exception as exc:  # the refusal already happened; losing its record must not crash us
            print(f"egress guard: could not record {item}: {exc!r}", file=sys.stderr)
        finally:
            pending.popleft()


def _record(action: str, target: str, outcome: str, details: dict) -> None:
    """Append one guard event, waiting for Django's apps to be ready."""
    # Imported here: the guard is installed before Django is set up (it must precede every import that could
    # open a socket), so the ledger is reached only once an event has to be written.
    from django.apps import apps

    deadline = time.monotonic() + 600
    while not apps.ready:
        if time.monotonic() > deadline:
            raise RuntimeError("Django never finished starting")
        time.sleep(0.2)
    from django.db import connections

    from audit.ledger import append

    try:
        append(action, actor=f"system:{details['process']}"[:200], target=target[:200], outcome=outcome,
               details=details)
    finally:
        connections.close_all()


def _isolated(module: types.ModuleType, namespace: dict) -> dict:
    """Return namespace with copies of module's own functions that read namespace as their globals."""
    for name, value in list(namespace.items()):
        if type(value) is _FunctionType and value.__module__ == module.__name__:
            namespace[name] = _FunctionType(value.__code__, namespace, value.__name__, value.__defaults__,
                                            value.__closure__)
    return namespace


def _private_namespace(policy: Policy) -> dict:
    """Return the installed hook's namespace: private copies of both guard modules, their state, the builtins."""
    snapshot = dict(vars(builtins))
    rules_namespace = _isolated(egress_policy, {**vars(egress_policy), "__builtins__": snapshot,
                                                "_resolve_cache": {}})
    namespace = _isolated(sys.modules[__name__], {**vars(sys.modules[__name__]), "__builtins__": snapshot})
    for name in ("judge_address", "judge_name"):
        namespace[name] = rules_namespace[name]
    namespace.update(_rules=_frozen_rules(policy.rules()), _pending=collections.deque(), _local=_thread._local(),
                     _seen=set(), _recorder_pid=0, _privates=(id(namespace), id(rules_namespace)))
    return namespace


def _query() -> tuple | None:
    """Return the installed hook's (rules, events not yet recorded), or None when no guard is installed."""
    answer = []
    _audit(QUERY_EVENT, answer)
    return answer[0] if answer else None


class GuardView:
    """A read-only view of this process's guard: its state lives in the hook's private namespace."""

    __slots__ = ()

    def __setattr__(self, name, value):
        """Refuse the assignment and record it."""
        refuse_tampering(f"assignment to guard().{name}")

    @property
    def installed(self) -> bool:
        """Return whether the hook answers."""
        return _query() is not None

    @property
    def policy(self) -> Policy:
        """Return a copy of the policy in force."""
        rules = _query()[0]
        return parse_allowlist(rules[3], rules[2])

    def allows_address(self, host: str, port: int | None) -> bool:
        """Return the hook's own judgement of a connection to host on port."""
        answer = []
        _audit(JUDGE_EVENT, host, port, answer)
        return answer[0]


def install_guard(environ=os.environ) -> GuardView:
    """Install the audit hook once per process (hooks cannot be removed) and return a view of it."""
    if _query() is None:
        sys.addaudithook(_private_namespace(policy_from_environment(environ))["_hook"])
    return GuardView()


def guard() -> GuardView | None:
    """Return a view of the installed guard, or None before install_guard()."""
    return GuardView() if _query() is not None else None


def set_policy(policy: Policy) -> None:
    """Replace the installed guard's policy; the change is recorded as an egress.policy_changed event."""
    if _query() is None:
        raise RuntimeError("egress guard: set_policy before install_guard()")
    _audit(SET_POLICY_EVENT, policy.rules())


def flush(timeout: float = 10.0) -> bool:
    """Wait until queued guard events are in the ledger; return whether that happened in time."""
    deadline = time.monotonic() + timeout
    while (state := _query()) is not None and state[1]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def startup_report() -> dict:
    """Return the guard's state and the offline values the Hugging Face libraries actually read."""
    view = guard()
    report = {"guard_installed": view is not None, "allowlist": view.policy.describe() if view else [],
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


sys.modules[__name__].__class__ = egress_policy.SealedModule
