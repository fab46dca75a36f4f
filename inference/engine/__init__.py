"""The engine core: it takes a model directory and token ids, and yields tokens. It imports no Django.

    core.py        Engine: the step loop (schedule, forward, sample, postprocess) on its own thread
    scheduler.py   which requests run in the next step: token budget, chunked prefill, KV admission, preemption
    cache.py       the KV cache the batch shares
    prefix_cache.py  the prefix cache's index: KV blocks keyed by a hash of their scope and token prefix
    runner.py      loads the model and runs one forward over the step's batch
    attention.py   the attention function the runner registers with transformers
    exact.py       opt-in bit-exact batching: every row's numbers equal running it alone
    precision.py   weight precision (float32, bfloat16, int8 weight-only) and the choice per machine
    sampling.py    penalties, temperature, top-k/top-p, seeded generators
    detokenize.py  incremental detokenization and stop sequences
    request.py     one request's state, its sampling parameters, its chunks, the engine's refusals
    outputs.py     hands chunks from the engine thread to the callers' event loops
    stats.py       figures for /metrics and the console; the KV budget the box can afford
    telemetry.py   MoE expert routing counts per layer
    grammar.py     structured output's grammar text (JSON schemas), which the web process checks
    constraint.py  a request's grammar applied: the mask of the tokens that may come next

`Engine` is imported lazily: the request types and the config are what the web process needs on every
path, and they do not load torch.
"""

from inference.engine.config import EngineConfig
from inference.engine.request import Chunk, EngineBusy, EngineClosed, PromptTooLong, RequestState, SamplingParams

__all__ = ["Chunk", "Engine", "EngineBusy", "EngineClosed", "EngineConfig", "PromptTooLong", "RequestState",
           "SamplingParams"]


def __getattr__(name: str):
    if name == "Engine":
        # Here: core pulls in transformers' model code, which the web process (it imports this package for its
        # config and wire types) never needs.
        from inference.engine.core import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
