"""Convert one GGUF file into a Hugging Face model directory: dequantized safetensors, tokenizer, chat template.

The worker runs this as a child process (`python -m appliance.gguf_convert SRC.gguf OUT`), so torch and
transformers never load into the worker itself and a conversion that runs away is killed with its process
group. It reports on stdout, one JSON object a line: {"phase": …} as it goes, then {"done": {…}} with what it
read from the file, or {"refused": "…"} (exit status 3) for a file transformers cannot read, naming why.

Importing the appliance package first installs the egress guard: nothing here may reach a model hub.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import appliance  # noqa: F401  (the egress guard and the offline variables, before transformers loads)

from .gguf_facts import read_facts  # noqa: E402

REFUSED_EXIT = 3
# Stored dtype per GGUF architecture; bf16 unless the architecture is known to need float32's range.
FLOAT32_ARCHITECTURES = frozenset({"t5", "umt5"})
NOT_ARCHITECTURES = frozenset({"general", "tokenizer"})  # keys of transformers' mapping that name no model


class Refused(Exception):
    """The file is a GGUF this box cannot convert; the message names the architecture or the problem."""


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def supported_architectures() -> set[str]:
    """Return the GGUF architecture names the installed transformers can read."""
    # Here, as in every function below: transformers (and torch) load only once the child has a file to work on.
    from transformers.integrations.gguf.utils import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return (set(GGUF_ARCHS) | set(GGUF_SUPPORTED_ARCHITECTURES)) - NOT_ARCHITECTURES


def check_architecture(src: Path, architecture: str) -> None:
    """Raise Refused unless transformers' GGUF loader reads this architecture (it renames a few on the way)."""
    # Here: see supported_architectures.
    from transformers.integrations.gguf.utils import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if architecture in GGUF_ARCHS:
        return
    try:
        load_gguf_checkpoint(str(src), return_tensors=False)  # the config only: no tensor is read
    except ValueError as exc:
        if "not supported" in str(exc):
            raise Refused(
                f"GGUF architecture {architecture!r} cannot be read by transformers "
                f"{_transformers_version()}; readable: {', '.join(sorted(supported_architectures()))}") from None
        raise Refused(f"{src.name}: transformers cannot read this GGUF ({exc})") from None


def _transformers_version() -> str:
    import transformers  # here: see supported_architectures

    return transformers.__version__


def _parse_each_file_once() -> None:
    """Have every GGUFReader of this process for one file be the same parsed reader.

    transformers parses the file anew for the config, the model's config, its tensors and the tokenizer, and the
    header of a real model (its vocabulary and merges as hundreds of thousands of small fields) takes seconds each
    time: on SmolLM2-135M's GGUF four parses were about half of the conversion. A reader only maps and reads the
    file, so sharing it within this short-lived child changes nothing else; main() does this once per process.
    """
    import gguf

    parse = gguf.GGUFReader
    readers: dict = {}

    def shared_reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = parse(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader  # transformers imports it from the package at each call


def convert(src: Path, out: Path) -> dict:
    """Write the dequantized model, its tokenizer and chat template into out; return what was converted."""
    facts = read_facts(src)
    check_architecture(src, facts["architecture"])
    emit(phase="loading", architecture=facts["architecture"])

    # Here, after the "loading" report: the worker shows that phase while torch and transformers load.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the worker reads stdout; tqdm's bars would only fill the log
    dtype = torch.float32 if facts["architecture"] in FLOAT32_ARCHITECTURES else torch.bfloat16
    # dequantize=True: plain dense weights, and no matmul kernel or attention fetched from the Hub.
    model = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=dtype, local_files_only=True,
        quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True)
    if not tokenizer.chat_template:
        raise Refused(f"{src.name} carries no chat template (tokenizer.chat_template); the chat API needs one")
    emit(phase="writing")
    # The stored config must not ask for GGUF again: the store holds plain safetensors.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.config.architectures = [type(model).__name__]
    _set_generation_ids(model, tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {**facts, "dtype": str(dtype).removeprefix("torch."), "model_class": type(model).__name__}


def _set_generation_ids(model, tokenizer) -> None:
    """Make generation stop where the GGUF says a turn ends (its eos token), as llama.cpp would."""
    gen = model.generation_config
    if tokenizer.eos_token_id is not None:
        gen.eos_token_id = tokenizer.eos_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m appliance.gguf_convert SRC.gguf OUT_DIR", file=sys.stderr)
        return 2
    src, out = Path(argv[0]), Path(argv[1])
    _parse_each_file_once()  # here, at the child's entry, so the shared readers never outlive this process
    try:
        emit(done=convert(src, out))
    except Refused as exc:
        emit(refused=str(exc))
        return REFUSED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
