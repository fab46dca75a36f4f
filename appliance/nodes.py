"""This box as a node of the appliance: what it registers about itself, and the heartbeat that keeps it fresh.

The heartbeat is a thread of the web process rather than a beat task: beat runs on one node of the appliance
only, and what a heartbeat reports (the engines alive, the requests in them) lives in the web process.
"""
import logging
import threading
import time
from importlib import metadata

import psutil
from django.conf import settings
from django.db import close_old_connections

from . import actions, engine_client, gpus

log = logging.getLogger(__name__)
ACTOR = "system:web"
_started = threading.Event()


def inventory() -> dict:
    """Return this box's GPUs (name and memory of each) and host memory, from the vendors' own interfaces."""
    found = []
    cuda = gpus.torch_cuda()
    for i in range(cuda.device_count() if cuda else 0):
        props = cuda.get_device_properties(i)
        found.append({"name": props.name, "memory_bytes": props.total_memory})
    return {"gpus": found, "memory_bytes": psutil.virtual_memory().total}


def software_version() -> str:
    """Return the installed appliance package's version."""
    try:
        return metadata.version("llm-appliance")
    except metadata.PackageNotFoundError:
        return "unknown"


def load() -> dict:
    """Return the variants this node's engines serve now and the requests running or waiting in them."""
    serving, outstanding = [], 0
    for name in engine_client.names():
        engine = engine_client.get(name)
        if engine is None or not engine.alive:
            continue
        serving.append(name)
        figures = engine.describe()
        outstanding += figures.get("running", 0) + figures.get("waiting", 0)
    return {"serving": sorted(serving), "outstanding": outstanding}


def _heartbeat_forever() -> None:
    while True:
        time.sleep(settings.NODE_HEARTBEAT_S)
        try:
            close_old_connections()
            actions.do_record_heartbeat(settings.APPLIANCE_NODE, **load())
        except Exception:
            log.exception("heartbeat of node %s failed; retrying", settings.APPLIANCE_NODE)


def start() -> None:
    """Register this node and start its heartbeat thread, once per process."""
    if _started.is_set():
        return
    _started.set()
    actions.do_register_node(settings.APPLIANCE_NODE, address=settings.APPLIANCE_NODE_ADDRESS,
                             version=software_version(), queue=settings.CELERY_TASK_DEFAULT_QUEUE, actor=ACTOR,
                             **inventory())
    threading.Thread(target=_heartbeat_forever, name="node-heartbeat", daemon=True).start()
