"""Check a model directory's weights and configs at import, reading only headers (no torch, no weights).

Every safetensors header is checked against its file the way the format defines it (a little-endian u64
length, a JSON table of tensors, then a data section the tensors tile exactly), the config's implied model
is compared with what the headers hold, and every JSON config is searched for hooks that make transformers
run code. A lie found here refuses the import, naming the file and the tensor or the figure, instead of
failing at deploy or building a model of millions of layers.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from inference.fit.bounds import MAX_PACKING, TOLERANCE, Implied, ModelOutOfBounds, check_buildable, figure

from .modelfiles import InvalidModelDir

# Bytes per element of every dtype the installed safetensors loads into torch (safetensors.torch._TYPES;
# tests/appliance/test_weightcheck.py keeps the two in step).
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8, "C64": 8,
}
MAX_HEADER_BYTES = 100_000_000  # the format's own limit (safetensors MAX_HEADER_SIZE)
MAX_RANK = 16  # real checkpoints use at most 5 dimensions; this keeps a lying shape cheap to multiply out
MAX_JSON_BYTES = 128 * 2**20  # the largest tokenizer.json files are tens of MB
# Keys with which transformers imports code shipped with a model (auto_map: configs, tokenizers, processors;
# custom_pipelines: pipeline()), and implementation names it resolves to a kernel fetched from the Hub.
REMOTE_CODE_KEYS = frozenset({"auto_map", "custom_pipelines"})
KERNEL_KEYS = frozenset({"attn_implementation", "_attn_implementation", "experts_implementation",
                         "_experts_implementation"})
_HUB_KERNEL = re.compile(r"^[^/:]+/[^/:]+")  # transformers.integrations.hub_kernels.is_kernel
_DECODER_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EMBEDDING = re.compile(r"^model\.embed_tokens\.weight$")


class InvalidWeights(InvalidModelDir):
    """Weights or configs that lie about themselves; the message names the file and the tensor or figure."""


@dataclass(frozen=True)
class Tensor:
    """One entry of a safetensors header, checked against its file."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        """Return the number of elements."""
        return math.prod(self.shape)


def check_model_dir(root: Path) -> dict[str, Tensor]:
    """Check every config and safetensors file under root; return the tensor table or raise InvalidWeights."""
    check_no_remote_code(root)
    config = _read_json(root / "config.json", "config.json")
    if not isinstance(config, dict):
        raise InvalidWeights("config.json is not a JSON object")
    tensors: dict[str, Tensor] = {}
    for path in sorted(root.rglob("*.safetensors")):
        rel = path.relative_to(root).as_posix()
        for name, tensor in check_safetensors(path, rel).items():
            if name in tensors:
                raise InvalidWeights(f"tensor {name} is in both {tensors[name].file} and {rel}")
            tensors[name] = tensor
    for index in sorted(root.rglob("*.safetensors.index.json")):
        _check_index(index, root, tensors)
    check_config_against_weights(config, tensors)
    return tensors


# ---- safetensors headers ----------------------------------------------------------------------------------

def check_safetensors(path: Path, rel: str) -> dict[str, Tensor]:
    """Return the checked tensor table of one safetensors file (rel names it in messages)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise InvalidWeights(f"{rel} is {size} bytes, too short for a safetensors header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise InvalidWeights(f"{rel} declares a {length:,}-byte header, over the format's "
                                 f"{MAX_HEADER_BYTES:,}-byte limit")
        if length > size - 8:
            raise InvalidWeights(f"{rel} declares a {length:,}-byte header but only {size - 8:,} bytes follow "
                                 f"the length (the file is truncated or not safetensors)")
        raw = fh.read(length)
    header = _parse_header(raw, rel)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise InvalidWeights(f"{rel}: __metadata__ must map strings to strings")
    tensors = {name: _tensor(rel, name, entry) for name, entry in header.items()}
    _check_tiling(rel, tensors, size - 8 - length)
    return tensors


def _parse_header(raw: bytes, rel: str) -> dict:
    """Return the header's JSON object, refusing anything the format does not allow."""
    if not raw.startswith(b"{"):
        raise InvalidWeights(f"{rel}: the header does not start with '{{' (not a safetensors file)")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except InvalidWeights as exc:
        raise InvalidWeights(f"{rel}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidWeights(f"{rel}: the header is not valid JSON ({str(exc)[:200]})") from None


def _no_duplicates(pairs: list) -> dict:
    """Build a JSON object, refusing a key given twice (two entries for one tensor hide one of them)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise InvalidWeights(f"the header names {key!r} twice")
        out[key] = value
    return out


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor(rel: str, name: str, entry) -> Tensor:
    """Return one header entry as a Tensor, or refuse it naming what is wrong."""
    where = f"{rel}: tensor {name}"
    if not isinstance(entry, dict):
        raise InvalidWeights(f"{where} is not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise InvalidWeights(f"{where} has unknown dtype {dtype!r} (known: {', '.join(DTYPE_BYTES)})")
    if not isinstance(shape, list) or not all(_whole(d) for d in shape):
        raise InvalidWeights(f"{where} has shape {shape!r}; expected a list of whole numbers")
    if len(shape) > MAX_RANK:
        raise InvalidWeights(f"{where} has {len(shape)} dimensions (at most {MAX_RANK})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise InvalidWeights(f"{where} has data_offsets {offsets!r}; expected [begin, end] with begin <= end")
    tensor = Tensor(rel, dtype, tuple(shape), offsets[0], offsets[1])
    need = tensor.numel * DTYPE_BYTES[dtype]
    if tensor.end - tensor.begin != need:
        raise InvalidWeights(f"{where}: shape {list(shape)} of {dtype} needs {figure(need)} bytes but data_offsets "
                             f"{offsets} hold {tensor.end - tensor.begin:,}")
    return tensor


def _check_tiling(rel: str, tensors: dict[str, Tensor], data_bytes: int) -> None:
    """Refuse tensors that overlap, leave gaps, or do not end exactly where the file does."""
    position, previous, gap = 0, None, None
    for name, t in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if t.begin < position:
            raise InvalidWeights(f"{rel}: tensor {name} (bytes {t.begin:,}-{t.end:,}) overlaps tensor {previous} "
                                 f"(which ends at {position:,})")
        if t.end > data_bytes:
            raise InvalidWeights(f"{rel}: tensor {name} ends at byte {t.end:,} of the data section, which holds "
                                 f"only {data_bytes:,} bytes (the file is truncated)")
        # A gap is reported after the whole table is read: tensors moved onto another's bytes leave one.
        gap = gap or (t.begin > position and f"{rel}: bytes {position:,}-{t.begin:,} of the data section, "
                                             f"before tensor {name}, belong to no tensor")
        position, previous = t.end, name
    if gap:
        raise InvalidWeights(gap)
    if position != data_bytes:
        raise InvalidWeights(f"{rel}: the tensors end at byte {position:,} of the data section but the file "
                             f"holds {data_bytes:,} bytes after the header")


def _check_index(index: Path, root: Path, tensors: dict[str, Tensor]) -> None:
    """Refuse a sharded checkpoint's index that points at files or tensors that are not there."""
    rel = index.relative_to(root).as_posix()
    value = _read_json(index, rel)
    weight_map = value.get("weight_map") if isinstance(value, dict) else None
    if not isinstance(weight_map, dict):
        raise InvalidWeights(f"{rel} has no weight_map object")
    base = index.parent.relative_to(root).as_posix()
    named = {shard for shard in weight_map.values() if isinstance(shard, str)}
    for shard in sorted(named):
        if not (index.parent / shard).is_file():
            raise InvalidWeights(f"{rel} names shard {shard!r}, which is missing")
    # Every shard beside the index must be one it names: transformers loads only those, so an extra one would
    # be counted, hashed and served as part of the model without ever being loaded.
    for extra in sorted(p.name for p in index.parent.glob("*.safetensors") if p.name not in named):
        raise InvalidWeights(f"{rel} does not name {extra}, which lies beside it; a shard must be in the index")
    for name, shard in weight_map.items():
        want = shard if base == "." else f"{base}/{shard}"
        if not isinstance(shard, str) or tensors.get(name) is None or tensors[name].file != want:
            raise InvalidWeights(f"{rel} places tensor {name} in {shard!r}, which does not hold it")


# ---- configs -----------------------------------------------------------------------------------------------

def _read_json(path: Path, rel: str):
    """Return a JSON file's value, refusing one too large, not UTF-8 or not JSON."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise InvalidWeights(f"{rel} is {path.stat().st_size:,} bytes, over the {MAX_JSON_BYTES:,}-byte limit "
                             f"for a JSON file in a model")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidWeights(f"{rel} is not valid JSON ({str(exc)[:200]})") from None


def check_no_remote_code(root: Path) -> None:
    """Refuse any JSON config that asks transformers for model-supplied code, naming the file and the key."""
    if (root / "custom_generate").exists():
        raise InvalidWeights("custom_generate/ holds a generate() for transformers to import; "
                             "the box runs no model-supplied code")
    for path in sorted(p for p in root.rglob("*.json") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        value = _read_json(path, rel)
        # Configs are searched at every depth (sub-configs of multimodal models); other JSON (tokenizer.json,
        # the shard index) only at the top, where a vocabulary entry cannot be mistaken for a key.
        for key, found in _keys(value, deep=path.name.endswith("config.json")):
            if key in REMOTE_CODE_KEYS:
                raise InvalidWeights(f"{rel} asks for remote code ({key}); the box runs no model-supplied code")
            if key in KERNEL_KEYS and isinstance(found, str) and _HUB_KERNEL.match(found):
                raise InvalidWeights(f"{rel} sets {key} to {found!r}, a kernel fetched from the Hub; "
                                     f"the box runs no model-supplied code")


def _keys(value, *, deep: bool):
    """Yield (key, value) of a JSON value's objects: the top one, or every nested one when deep."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                yield key, inner
                if deep and isinstance(inner, (dict, list)):
                    stack.append(inner)
        elif deep and isinstance(item, list):
            stack.extend(item)


def check_config_against_weights(config: dict, tensors: dict[str, Tensor]) -> None:
    """Refuse a config whose layers, embedding or parameter count disagree with the weights' headers."""
    try:
        implied = check_buildable(config)
    except ModelOutOfBounds as exc:
        raise InvalidWeights(str(exc)) from None
    held = sum(t.numel for t in tensors.values())
    if implied.exact:
        _check_layers(implied, tensors)
        embedding = next((n for n in tensors if _EMBEDDING.match(n)), None)
        if embedding and not implied.quantized and tensors[embedding].shape != (implied.vocab, implied.hidden):
            raise InvalidWeights(
                f"config.json says vocab_size={implied.vocab:,}, hidden_size={implied.hidden:,}, but {embedding} "
                f"in {tensors[embedding].file} is {list(tensors[embedding].shape)}")
    # An exact count may miss only the optional MTP modules; an unknown architecture's is a lower bound;
    # packed (quantized) weights hold up to MAX_PACKING parameters an element.
    low = (implied.total - implied.optional) * (1 - TOLERANCE) / (MAX_PACKING if implied.quantized else 1)
    high = implied.total * (1 + TOLERANCE) if implied.exact else math.inf
    if not low <= held <= high:
        raise InvalidWeights(
            f"config.json implies {implied.total:,} parameters ({implied.describe()}) but the safetensors "
            f"headers hold {held:,} (tolerance {TOLERANCE:.0%})")


def _check_layers(implied: Implied, tensors: dict[str, Tensor]) -> None:
    """Refuse a config whose num_hidden_layers disagrees with the decoder layers the tensor names hold."""
    present = {int(m.group(1)) for n in tensors if (m := _DECODER_LAYER.match(n))}
    if not present:
        return  # names of another scheme: the parameter count still bounds the config
    # The first absent index is at most len(present), so this stays short whatever the config claims.
    missing = next((i for i in range(min(implied.layers, len(present) + 1)) if i not in present), None)
    if missing is not None:
        raise InvalidWeights(
            f"config.json says num_hidden_layers={implied.layers:,} but the weights hold {len(present):,} decoder "
            f"layers (model.layers.{missing}.* is missing)")
    if max(present) >= implied.layers + implied.extra_layers:
        raise InvalidWeights(f"the weights hold model.layers.{max(present)}.* but config.json says "
                             f"num_hidden_layers={implied.layers:,}")

