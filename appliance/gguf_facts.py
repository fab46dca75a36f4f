"""Read what a GGUF file says about itself (architecture, quantization, license, origin) without loading weights.

Uses the `gguf` package's reader, which maps the file and parses its header; it needs numpy only, so the
worker can call it before deciding to start a conversion.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from .modelfiles import InvalidModelDir

# Scalar metadata kept as provenance; arrays (the vocabulary, merges) are left out.
MAX_VALUE_CHARS = 500
# general.* keys (GGUF spec, "General metadata") that say where a model came from.
ORIGIN_KEYS = ("general.name", "general.organization", "general.basename", "general.finetune", "general.size_label",
               "general.license", "general.license.name", "general.license.link", "general.url",
               "general.repo_url", "general.source.url", "general.source.repo_url",
               "general.source.huggingface.repository", "general.version")
BF16_BYTES = 2


def read_facts(path: Path) -> dict:
    """Return {architecture, file_type, tensor_types, parameters, dequantized_bytes, metadata} of a GGUF file."""
    from gguf import GGUFReader, GGUFValueType, LlamaFileType  # here: the gguf package loads only for a GGUF import

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct errors or IndexError on a corrupt header
        raise InvalidModelDir(f"{path.name} is not a readable GGUF file ({str(exc)[:200]})") from None
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        try:
            value = field.contents()
        except Exception:
            continue
        if isinstance(value, float):
            value = repr(value)  # the ledger's canonical JSON takes no floats
        if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
            value = value[:MAX_VALUE_CHARS] + "…"
        metadata[key] = value
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise InvalidModelDir(f"{path.name} has no general.architecture; not a model GGUF")
    file_type = metadata.get("general.file_type")
    try:
        file_type_name = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else ""
    except ValueError:
        file_type_name = f"unknown ({file_type})"
    tensor_types = Counter(t.tensor_type.name for t in reader.tensors)
    parameters = sum(int(t.n_elements) for t in reader.tensors)
    return {
        "architecture": architecture,
        "file_type": file_type_name,
        "tensor_types": dict(sorted(tensor_types.items())),
        "parameters": parameters,
        "dequantized_bytes": parameters * BF16_BYTES,
        "chat_template": "tokenizer.chat_template" in reader.fields,
        "metadata": metadata,
    }


def origin(facts: dict) -> dict:
    """Return the upstream and license a GGUF's general.* metadata states (only the keys it has)."""
    meta = facts.get("metadata", {})
    found = {key.removeprefix("general."): meta[key] for key in ORIGIN_KEYS if key in meta}
    bases = sorted({k.split(".")[2] for k in meta if k.startswith("general.base_model.")})
    base_models = []
    for n in bases:
        entry = {field: meta[f"general.base_model.{n}.{field}"]
                 for field in ("name", "organization", "repo_url") if f"general.base_model.{n}.{field}" in meta}
        if entry:
            base_models.append(entry)
    if base_models:
        found["base_models"] = base_models
    return found
