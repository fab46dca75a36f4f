"""Which engine serves a deployment, and starting it: the builtin engine process, or vLLM supervised the same way.

A deployment names its engine (appliance.models.Engine); `auto` is resolved here, when the web process loads it:
vLLM where it is installed (settings.VLLM_PYTHON) and CUDA is present, else builtin. On a CPU box `auto` stays
builtin: vLLM's CPU build is a community package, slower than the builtin engine on the small models and unable
to start some architectures the builtin engine serves. Every engine's client answers the team API the same way
(encode_chat, submit → chunks, describe, close, alive), so keys, quotas, usage, transcripts and the ledger are
settled by the same code whichever engine generated the tokens.
"""
from __future__ import annotations

import os
from urllib.parse import urlsplit

from django.conf import settings

from inference.engine.config import EngineConfig

from . import engine_client, gpus
from .importer import store_path
from .models import Node


class EngineUnavailable(RuntimeError):
    """The engine a deployment asks for cannot run on this box; the message says what is missing."""


def installed(python: str) -> bool:
    """Return whether an engine's interpreter setting points at an executable."""
    return bool(python) and os.access(python, os.X_OK)


def cuda_present() -> bool:
    return gpus.torch_cuda() is not None


def resolve(engine: str) -> str:
    """Return the engine that serves a deployment asking for `engine`: `auto` becomes vllm or builtin."""
    if engine != "auto":
        return engine
    return "vllm" if installed(settings.VLLM_PYTHON) and cuda_present() else "builtin"


def start(deployment, config: EngineConfig):
    """Start the engine of one deployment and return its client once it is ready; raise EngineUnavailable."""
    name = deployment.variant.name
    model_dir = store_path(name)  # this node's copy
    chosen = resolve(deployment.engine)
    if chosen == "builtin":
        return engine_client.start_engine(name, model_dir, config)
    if chosen == "vllm":
        check_vllm()
        from . import vllm_engine  # here: its client loads the tokenizer stack, for a vLLM deployment only

        if deployment.parts:  # the head of a deployment over several boxes
            return vllm_engine.start_vllm(name, model_dir, settings.VLLM_PYTHON,
                                          *across_nodes(deployment, settings.APPLIANCE_NODE))
        return vllm_engine.start_vllm(name, model_dir, settings.VLLM_PYTHON, deployment.engine_flags)
    # SGLang: its PyPI build is CUDA-only, so no box this appliance is tested on could start it; what it has of SGLang
    # is the plan as SGLang's flags, checked with SGLang's own parser (manage.py fit --engine-flags --engine sglang).
    raise EngineUnavailable(f"the {chosen} engine is not supported by this appliance yet: deploy on builtin or vllm "
                            "(`manage.py fit MODEL --engine-flags --engine sglang` prints SGLang's command lines)")


def check_vllm() -> None:
    """Raise EngineUnavailable unless vLLM is installed on this box."""
    if not installed(settings.VLLM_PYTHON):
        raise EngineUnavailable("vLLM is not installed on this box: set APPLIANCE_VLLM_PYTHON to the python of "
                                "its virtualenv (bash bench/peers_setup.sh vllm builds one)")


def start_part(deployment):
    """Start this node's part of a deployment over several boxes and return it once started; raise
    EngineUnavailable."""
    check_vllm()
    from . import vllm_engine

    name = deployment.variant.name
    return vllm_engine.start_vllm_part(name, store_path(name), settings.VLLM_PYTHON,
                                       *across_nodes(deployment, settings.APPLIANCE_NODE))


def across_nodes(deployment, node: str) -> tuple[list[str], list[str], str]:
    """Return `node`'s vLLM arguments in a deployment over several boxes (the head first, then its parts), with the
    head's address in them, the hosts of the deployment's other nodes (what its engine's guard lets it reach) and
    `node`'s own host."""
    from inference.fit.engine_flags import part_args, with_head

    nodes = [deployment.node, *deployment.parts]
    addresses = dict(Node.objects.filter(name__in=nodes).values_list("name", "address"))
    hosts = {}
    for other in nodes:
        host = urlsplit(addresses.get(other, "")).hostname
        if not host:
            raise EngineUnavailable(f"node {other} of {deployment.variant.name}'s deployment has no registered "
                                    "address; is its web process running?")
        hosts[other] = host
    arguments = with_head(part_args(deployment.engine_flags, nodes.index(node)), hosts[deployment.node])
    return arguments, [hosts[other] for other in nodes if other != node], hosts[node]
