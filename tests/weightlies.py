"""Make model directories whose weights or configs lie, from copies of the demo models (for the weight checks)."""
import json
import shutil
import struct
from pathlib import Path


def copy_model(src: Path, dst: Path) -> Path:
    """Copy a model directory to dst and return dst."""
    shutil.copytree(src, dst)
    return dst


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    """Return a safetensors file's header (a dict) and its data section."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_safetensors(path: Path, header: dict | bytes, data: bytes, *, declared_length: int | None = None) -> None:
    """Write a safetensors file from a header (dict or raw bytes) and data; declared_length may lie."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if declared_length is None else declared_length
    path.write_bytes(struct.pack("<Q", length) + raw + data)


def edit_header(path: Path, edit) -> None:
    """Rewrite a safetensors file with edit(header) applied to its header (edit changes it in place)."""
    header, data = read_safetensors(path)
    edit(header)
    write_safetensors(path, header, data)


def edit_json(path: Path, **changes) -> None:
    """Set keys of a JSON file."""
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def last_tensor(header: dict) -> str:
    """Return the name of the tensor whose data comes last."""
    return max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])
