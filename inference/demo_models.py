"""Write three tiny random-weight models with real architectures, for tests and demos without a GPU.

Each model is a complete Hugging Face directory (config, safetensors weights, tokenizer, chat template,
generation config) plus an `appliance.json` that labels it as a random-weight demo, so the import,
hashing, fit and serving paths run on exactly the code a real model would take. Everything is
deterministic: the same transformers/tokenizers versions write byte-identical files, so their hashes
are stable across runs and machines.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GenerationConfig,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.utils import logging as hf_logging

CORPUS_PATH = Path(__file__).with_name("demo_corpus.txt")
METADATA_FILE = "appliance.json"
# What a directory needs before the management command treats it as already built.
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    METADATA_FILE,
)

BOS, EOT, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
# Trained first, so their ids are 0..3 in this order.
SPECIAL_TOKENS = (BOS, EOT, IM_START, IM_END)
TOKENIZER_VOCAB_SIZE = 1536  # an upper bound: the small corpus runs out of merges at ~1.5k
CONTEXT_LENGTH = 2048

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class DemoSpec:
    """One demo model: its architecture, label and weight seed."""

    name: str
    kind: str  # "moe" | "distilled" | "dense", the appliance's variant families
    seed: int
    description: str


DEMO_SPECS: dict[str, DemoSpec] = {
    spec.name: spec
    for spec in (
        DemoSpec(
            "demo-moe",
            "moe",
            seed=1001,
            description="DeepSeek-V3 architecture (MLA attention, 16 routed experts with 4 active per token, "
            "1 shared expert, first layer dense) at toy size.",
        ),
        DemoSpec(
            "demo-distilled",
            "distilled",
            seed=1002,
            description="Qwen2 architecture (grouped-query attention, qkv bias, tied embeddings) at toy size, "
            "standing in for a distilled dense model.",
        ),
        DemoSpec(
            "demo-dense",
            "dense",
            seed=1003,
            description="Llama architecture (grouped-query attention, SwiGLU MLP) at toy size.",
        ),
    )
}


MODEL_TYPES = {"moe": "deepseek_v3", "distilled": "qwen2", "dense": "llama"}


def train_tokenizer(corpus: str | None = None) -> PreTrainedTokenizerFast:
    """Train the shared byte-level BPE tokenizer on the shipped corpus and wrap it for transformers."""
    text = CORPUS_PATH.read_text(encoding="utf-8") if corpus is None else corpus
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols up front, so any UTF-8 input encodes, not only what the corpus contains.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=EOT,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=CONTEXT_LENGTH,
    )


# transformers' Qwen2 tokenizer class always has "<|endoftext|>" (its unknown/end token): a Qwen2 directory
# without it gets it appended on load, one id past an embedding sized to the trained vocabulary.
QWEN2_ENDOFTEXT = "<|endoftext|>"


def tokenizer_for(model_type: str, tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Return the tokenizer a model of `model_type` is saved with: the shared one, plus the tokens its
    tokenizer class adds on load (so the config's vocab_size covers every id the loaded tokenizer has)."""
    if model_type != "qwen2":
        return tokenizer
    qwen = copy.deepcopy(tokenizer)
    qwen.add_special_tokens({"unk_token": QWEN2_ENDOFTEXT})
    return qwen


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Return the config fields that name special-token ids."""
    bos, eot, im_end = (tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOT, IM_END))
    return {"bos_token_id": bos, "eos_token_id": im_end, "pad_token_id": eot}


def build_config(spec: DemoSpec, tokenizer: PreTrainedTokenizerFast) -> PreTrainedConfig:
    """Return the tiny architecture config for one demo model."""
    common = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=CONTEXT_LENGTH,
        rms_norm_eps=1e-6,
        **_token_ids(tokenizer),
    )
    if spec.kind == "moe":
        return DeepseekV3Config(
            hidden_size=128,
            intermediate_size=256,  # the dense MLP of the first layer
            moe_intermediate_size=64,  # each routed and shared expert
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            # Group-limited routing as in the real model: 4 groups of 4 experts, best 2 groups kept.
            n_group=4,
            topk_group=2,
            # Scores and routing as DeepSeek-V3's config states them: sigmoid scores, group-limited top-k with the
            # e_score_correction_bias the real checkpoint carries (its weights hold the bias per expert).
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            num_attention_heads=4,
            num_key_value_heads=4,
            # MLA with DeepSeek-V3's real latent ranks (kv_lora_rank 512 + rope 64: a latent head of 576, the
            # only one vLLM's CPU MLA kernels take); toy-sized heads elsewhere: query/key 64 + 64, value 64.
            q_lora_rank=64,
            kv_lora_rank=512,
            qk_nope_head_dim=64,
            qk_rope_head_dim=64,
            v_head_dim=64,
            # The real checkpoint carries a multi-token-prediction layer that transformers ignores; ours has none.
            num_nextn_predict_layers=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
            **common,
        )
    if spec.kind == "distilled":
        return Qwen2Config(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=3,
            # Heads of 64, as Qwen2.5's (a head of 24 is not one that attention kernels of other servers take).
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
            **common,
        )
    if spec.kind == "dense":
        return LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            tie_word_embeddings=False,
            **common,
        )
    raise ValueError(f"unknown demo kind {spec.kind!r}")


def _write_model(spec: DemoSpec, tokenizer: PreTrainedTokenizerFast, target: Path) -> None:
    """Write one complete demo model directory at `target`."""
    tokenizer = tokenizer_for(MODEL_TYPES[spec.kind], tokenizer)
    config = build_config(spec, tokenizer)
    # A private RNG scope: the weights depend only on the spec's seed, and callers' RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids = _token_ids(tokenizer)
    # Chat answers end with <|im_end|>; raw completions may also end with <|end_of_text|>.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"],
        eos_token_id=[ids["eos_token_id"], ids["pad_token_id"]],
        pad_token_id=ids["pad_token_id"],
    )
    with _progress_bars_disabled():
        model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    metadata = {"demo": True, "random_weights": True, "kind": spec.kind, "description": _description(spec)}
    (target / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    # mkdtemp and the safetensors writer create owner-only modes; a model directory is ordinary shared data.
    target.chmod(0o755)
    for path in target.iterdir():
        path.chmod(0o644)


@contextmanager
def _progress_bars_disabled() -> Iterator[None]:
    """Silence transformers' "Writing model shards" bar for a three-file write, then restore it."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _description(spec: DemoSpec) -> str:
    """Return the human label stored in appliance.json."""
    return (
        f"Demo model with RANDOM weights (seed {spec.seed}); it produces nonsense and exists only to "
        f"exercise the appliance without a GPU or real weights. {spec.description}"
    )


def is_complete(model_dir: Path) -> bool:
    """Return True when `model_dir` holds every file a demo model needs."""
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


def make_demo_models(out_dir: Path, *, names: list[str] | tuple[str, ...] | None = None) -> list[Path]:
    """Write the named demo models (all by default) into `out_dir/<name>/` and return their directories."""
    selected = list(DEMO_SPECS) if names is None else list(names)
    unknown = [n for n in selected if n not in DEMO_SPECS]
    if unknown:
        raise ValueError(f"unknown demo model(s) {unknown}; choose from {sorted(DEMO_SPECS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()  # trained once, saved into every model directory
    written = []
    for name in selected:
        target = out_dir / name
        # Build next to the target and swap it in, so an interrupted run never leaves a half-written model
        # that a later run would mistake for a complete one.
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
        try:
            _write_model(DEMO_SPECS[name], tokenizer, staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        written.append(target)
    return written
