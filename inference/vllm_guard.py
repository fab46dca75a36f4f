"""The egress guard and the offline and no-telemetry switches of a vLLM engine's interpreters, and their check.

vLLM runs in a virtualenv of its own (it pins its own torch and transformers), where the appliance's package is
not installed; its engine process is started with inference/vllm_site first on PYTHONPATH, whose sitecustomize
calls guard_this_interpreter() before any of vLLM's code runs, in the API server and in every process vLLM starts
from it (EngineCore, workers; forked or spawned alike). Imports only the standard library and audit.egress.

A refusal is raised where vLLM tried to connect; the ledger cannot be written from here (no Django in vLLM's
virtualenv), so the guard's recorder prints the refused attempt to the engine's log instead.
"""
import json
import os
import socket
import sys

from audit import egress
from audit.egress_policy import LOOPBACK

# What vLLM 0.32 reads to send usage statistics (vllm/envs.py, vllm/usage/usage_lib.py: any one turns them off;
# all three are set so an upgrade that drops one still finds another). OpenTelemetry exports only where an
# endpoint is configured, so its variables are removed.
TELEMETRY_OFF = {"VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}
REMOVED_PREFIXES = ("OTEL_",)
# An address outside every allowlist (TEST-NET-1, RFC 5737): the check asks the guard about a connect to it, and
# never makes one.
OUTSIDE = ("192.0.2.1", 443)


# The hosts of the other nodes of a deployment over several boxes (set by the web process that starts its part):
# its data-parallel ranks talk to each other there, and to nothing else off loopback.
PEERS_VARIABLE = "APPLIANCE_ENGINE_PEERS"


def guard_this_interpreter(environ=os.environ) -> None:
    """Switch telemetry off, set the offline variables and install the egress guard (loopback only, and the other
    nodes of a deployment over several boxes)."""
    for name in [n for n in environ if n.startswith(REMOVED_PREFIXES)]:
        del environ[name]
    environ.update(TELEMETRY_OFF)
    peers = [host for host in environ.get(PEERS_VARIABLE, "").split(",") if host]
    # The engine talks to the web process on loopback only.
    environ["APPLIANCE_EGRESS_ALLOW"] = ",".join([*LOOPBACK, *peers])
    egress.set_offline_environment()
    egress.install_guard(environ)


def outside_connection_refused() -> str:
    """Put a connect outside the allowlist to the installed guard; return its refusal, or say that nothing refused it.

    Only the audit event that socket.connect raises before it connects, raised here by hand: the guard judges it as
    it judges a real connect, and no connect is made, so not a packet can leave even were the guard missing.
    """
    with socket.socket() as sock:
        try:
            sys.audit("socket.connect", sock, OUTSIDE)
        except PermissionError as exc:
            return f"refused: {exc}"
    return "not refused"


def report() -> dict:
    """Return what this interpreter really has: guard, offline values read by the libraries, vLLM's telemetry."""
    import huggingface_hub.constants  # noqa: F401  (startup_report reads the values these libraries computed)
    import transformers.utils.hub  # noqa: F401
    import vllm
    import vllm.envs
    from vllm.platforms import current_platform
    from vllm.usage import usage_lib

    found = egress.startup_report()
    found.update(pid=os.getpid(), python=sys.executable, engine="vllm", vllm_version=vllm.__version__,
                 device=current_platform.device_type, outside_connection=outside_connection_refused(),
                 telemetry={"VLLM_NO_USAGE_STATS": vllm.envs.VLLM_NO_USAGE_STATS,
                            "VLLM_DO_NOT_TRACK": vllm.envs.VLLM_DO_NOT_TRACK,
                            "usage_stats_enabled": usage_lib.is_usage_stats_enabled(),
                            "environment": {name: os.environ.get(name) for name in TELEMETRY_OFF}})
    return found


def write_report(path: str) -> None:
    """Write the report whole or not at all (the web process waits for the file, then reads it)."""
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as out:
        json.dump(report(), out)
    os.replace(partial, path)
