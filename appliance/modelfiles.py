"""Inspect, copy and hash model directories without loading any weights.

The worker uses this: it never imports torch, so parameter counts come from
the safetensors headers (a JSON table of names, dtypes and shapes).
"""
import hashlib
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Formats that unpickle on load can run arbitrary code; the box refuses them.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
HASH_CHUNK = 4 * 1024 * 1024


class InvalidModelDir(ValueError):
    """The directory is not a model this box will accept; the message says why."""


@dataclass
class ModelSummary:
    architecture: str
    model_type: str
    dtype: str
    params_total: int
    params_active: int
    context_length: int | None
    metadata: dict


def validate_model_dir(path: Path) -> dict:
    """Return the parsed config.json of a model dir, or raise InvalidModelDir saying what is wrong."""
    if not path.is_dir():
        raise InvalidModelDir(f"{path} is not a directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InvalidModelDir(f"{path} has no config.json")
    pickles = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidModelDir(
            f"{path} contains pickle-based weights ({', '.join(pickles)}); only safetensors are accepted"
        )
    if not any(path.rglob("*.safetensors")):
        raise InvalidModelDir(f"{path} has no *.safetensors weights")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelDir(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidModelDir(f"{config_path} is not a JSON object")
    if "auto_map" in config:
        raise InvalidModelDir(f"{config_path} asks for remote code (auto_map); the box runs no model-supplied code")
    return config


def model_files(path: Path) -> list[Path]:
    """Return every regular file under path, sorted by relative path."""
    return sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())


def copy_and_hash(src: Path, dst: Path, progress: Callable[[int, int], None] = lambda done, total: None) -> dict:
    """Copy src into dst (which must not exist), returning {relative path: sha256} of the bytes written."""
    files = model_files(src)
    total = sum(f.stat().st_size for f in files) or 1
    done = 0
    manifest = {}
    dst.mkdir(parents=True)
    for f in files:
        rel = f.relative_to(src).as_posix()
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with f.open("rb") as fin, target.open("wb") as fout:
            while chunk := fin.read(HASH_CHUNK):
                digest.update(chunk)
                fout.write(chunk)
                done += len(chunk)
                progress(done, total)
            fout.flush()
            os.fsync(fout.fileno())
        manifest[rel] = digest.hexdigest()
    return manifest


def hash_dir(path: Path) -> dict:
    """Return {relative path: sha256} of every file under path."""
    manifest = {}
    for f in model_files(path):
        digest = hashlib.sha256()
        with f.open("rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                digest.update(chunk)
        manifest[f.relative_to(path).as_posix()] = digest.hexdigest()
    return manifest


def manifest_mismatches(expected: dict, actual: dict) -> list[str]:
    """Return human-readable differences between two manifests (empty when they match)."""
    problems = []
    for rel in sorted(set(expected) | set(actual)):
        if rel not in actual:
            problems.append(f"{rel} is missing")
        elif rel not in expected:
            problems.append(f"{rel} is not in the manifest")
        elif expected[rel] != actual[rel]:
            problems.append(f"{rel} has changed (sha256 {actual[rel][:12]}…, expected {expected[rel][:12]}…)")
    return problems


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def read_safetensors_header(path: Path) -> dict:
    """Return the tensor table of a safetensors file: {name: {dtype, shape, data_offsets}}."""
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise InvalidModelDir(f"{path.name} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 1024 * 1024:
            raise InvalidModelDir(f"{path.name} has an implausible safetensors header ({length} bytes)")
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidModelDir(f"{path.name} has a corrupt safetensors header: {exc}") from exc
    header.pop("__metadata__", None)
    return header


# Tensors checkpoints store that the loaded model holds as buffers, not
# parameters: DeepSeek-V3's router keeps its load-balancing bias this way.
BUFFER_SUFFIXES = ("e_score_correction_bias",)


def is_routed_expert(tensor_name: str) -> bool:
    return ".experts." in tensor_name or tensor_name.endswith(".experts")


def summarize(path: Path, config: dict) -> ModelSummary:
    """Count parameters from the safetensors headers and read what the config says."""
    total = routed = 0
    dtypes: dict[str, int] = {}
    for f in sorted(path.rglob("*.safetensors")):
        for name, info in read_safetensors_header(f).items():
            if name.endswith(BUFFER_SUFFIXES):
                continue
            count = math.prod(info["shape"])
            total += count
            if is_routed_expert(name):
                routed += count
            dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + count
    experts = config.get("n_routed_experts") or config.get("num_local_experts") or config.get("num_experts")
    per_token = config.get("num_experts_per_tok")
    active = total
    if experts and per_token and routed:
        active = total - routed + routed * per_token // experts
    metadata_path = path / "appliance.json"
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    architectures = config.get("architectures") or [""]
    return ModelSummary(
        architecture=architectures[0],
        model_type=str(config.get("model_type", "")),
        dtype=max(dtypes, key=dtypes.get) if dtypes else str(config.get("torch_dtype", "")),
        params_total=total,
        params_active=active,
        context_length=config.get("max_position_embeddings"),
        metadata=metadata,
    )
