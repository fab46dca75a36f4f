"""Load a model for batched serving and run one step of it: pure functions around the model forward.

A step is one forward over a flat batch [1, N]: the whole prompt of every newly admitted request (batched
prefill) and the last sampled token of every running one (decode), each with its own positions and its
own KV store. It returns next-token logits, one row per request.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import is_accelerate_available

from inference.engine.cache import DIRECT_MODEL_TYPES, BatchCache, KVStore
from inference.engine.attention import ATTENTION_NAME
from inference.engine.exact import StepLayout, make_exact, step_context
from inference.engine.lean import LeanDecoder, lean_decoder
from inference.engine.mla import install_absorbed_mla
from inference.engine.precision import load_dtype, pack_bf16_weights, quantize_int8_weight_only

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """Return "cuda" or "cpu" for a requested device of "auto", "cuda" or "cpu"."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f'device must be "auto", "cuda" or "cpu", got {device!r}')
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no GPU")
    return device


def load_model(model_dir: Path, device: str, precision: str = "float32") -> PreTrainedModel:
    """Load a causal LM from a local directory only: safetensors weights, no hub, no remote code.

    `precision` is a resolved one ("float32", "bfloat16" or "int8", see precision.resolve_precision); int8
    loads in its compute dtype and then converts the layers to int8 weight-only in place.
    """
    kwargs = dict(local_files_only=True, trust_remote_code=False, use_safetensors=True)
    dtype = load_dtype(precision)
    if device == "cpu":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs)
        if precision == "int8":
            quantize_int8_weight_only(model)
    elif is_accelerate_available():
        # "auto" spreads layers over every visible GPU.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map="auto", **kwargs)
    else:
        # transformers needs `accelerate` for any device_map; without it one GPU still works.
        log.warning("accelerate is not installed: loading %s onto one GPU only", model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs).to("cuda")
    return model.eval()


@dataclass
class Runner:
    """A loaded model made ready for batched steps."""

    model: PreTrainedModel
    exact: bool  # bit-exact against unbatched generate (CPU float32); GPUs take the plain batched products
    direct_cache: bool
    cache_kwarg: str
    input_device: torch.device  # where the embeddings are: token ids go here
    output_device: torch.device  # where the LM head is: logits, sampling generators and penalty counts live here
    lean: LeanDecoder | None = None  # plain mode's forward for Llama-family models on CPU (lean.py)

    @classmethod
    def prepare(cls, model: PreTrainedModel, *, exact: bool) -> Runner:
        """Switch the model to per-request attention and per-segment experts (exact mode) or to absorbed latent
        attention and weights laid out for the CPU's bfloat16 kernels (plain mode), and describe how to call it."""
        model.config._attn_implementation = ATTENTION_NAME
        absorbed_mla = 0
        if exact:
            make_exact(model)
        else:
            absorbed_mla = install_absorbed_mla(model)  # reads kv_b_proj's weight, so before it is packed
            pack_bf16_weights(model)
        lean = None if exact else lean_decoder(model)  # after packing: it keeps the head it is given
        forward_params = inspect.signature(model.forward).parameters
        # transformers 5.24 calls the KV cache argument `cache` (`past_key_values` is deprecated until 5.40).
        cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        return cls(
            model=model,
            exact=exact,
            # Absorbed MLA reads each request's latents from its store, as direct attention does.
            direct_cache=model.config.model_type in DIRECT_MODEL_TYPES or absorbed_mla > 0,
            cache_kwarg=cache_kwarg,
            input_device=model.get_input_embeddings().weight.device,
            output_device=(model.get_output_embeddings() or model.get_input_embeddings()).weight.device,
            lean=lean,
        )

    def step(self, stores: list[KVStore], new_tokens: list[list[int]]) -> torch.Tensor:
        """Run one forward; `new_tokens[i]` extends request i's store. Return float32 logits [R, V]."""
        token_lengths = [len(t) for t in new_tokens]
        history_lengths = [s.length + n for s, n in zip(stores, token_lengths)]
        flat = [t for tokens in new_tokens for t in tokens]
        positions = [p for s, n in zip(stores, token_lengths) for p in range(s.length, s.length + n)]
        last = []
        at = -1
        for n in token_lengths:
            at += n
            last.append(at)
        device = self.input_device
        input_ids = torch.tensor([flat], dtype=torch.long, device=device)  # [1, N]
        position_ids = torch.tensor([positions], dtype=torch.long, device=device)  # [1, N]
        # [R]: the last position of each request. On the CPU, since with layers spread over GPUs the last
        # hidden states may sit on another device than the embeddings, and CPU indices index any device.
        keep = torch.tensor(last)
        cache = BatchCache(stores, token_lengths, direct=self.direct_cache)
        layout = StepLayout(token_lengths, history_lengths, cache=cache)
        if len(stores) == 1:
            layout.mode = "plain"  # one request alone is exactly what generate computes: nothing to split
        with step_context(layout):
            if self.lean is not None:
                logits = self.lean(input_ids, position_ids, cache, keep)  # [R, V]
            else:
                logits = self.model(
                    input_ids=input_ids,
                    position_ids=position_ids,
                    use_cache=True,
                    logits_to_keep=keep,
                    **{self.cache_kwarg: cache},
                ).logits[0]
        cache.commit()
        # float32 before sampling, as generate() does, so greedy picks the same argmax.
        return logits.float()  # [R, V]

    def kv_bytes_per_token(self) -> int:
        """Return how many bytes of KV cache one token takes, measured with a one-token forward."""
        store = KVStore(1, 1)
        with torch.inference_mode():
            self.step([store], [[0]])
        return store.nbytes()
