"""Inspect, copy and hash model directories without loading any weights.

The worker uses this: it never imports torch, so parameter counts come from
the safetensors headers (a JSON table of names, dtypes and shapes).
"""
import errno
import hashlib
import json
import math
import os
import shutil
import stat
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
    model_files(path)  # refuses links and special files before anything below opens a path inside
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


GGUF_MAGIC = b"GGUF"


def is_gguf_file(path: Path) -> bool:
    """Return whether path is a regular file that starts like a GGUF (Ollama's blobs have no suffix)."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return False
        with path.open("rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def validate_gguf_file(path: Path) -> None:
    """Refuse a GGUF source that is not a regular file (a link, a FIFO, a directory) or not a GGUF at all."""
    try:
        st = path.lstat()
    except OSError as exc:
        raise InvalidModelDir(f"{path} cannot be read: {exc.strerror}") from None
    kind = _odd_kind(st.st_mode)
    if kind:
        raise InvalidModelDir(f"{path} is a {kind}; only a regular GGUF file is imported, and links are never followed")
    if not is_gguf_file(path):
        raise InvalidModelDir(f"{path} is not a GGUF file (it does not start with the GGUF magic)")


FILE_MODE = 0o640  # the store's own permissions, set explicitly: never the source's mode, never umask luck
DIR_MODE = 0o750
SYNC_EVERY = 256 * 1024 * 1024  # write back in steps, so no single fsync holds a shard's worth of dirty pages


class OutsideStore(ValueError):
    """A path meant for the model store resolves to the store itself or to somewhere outside it."""


def _odd_kind(mode: int) -> str | None:
    """Return what an entry is when it is neither a regular file nor a directory (a link, a FIFO, …)."""
    for test, kind in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else "special file"


def _entries(root: Path):
    """Yield (relative path, name, dir fd, lstat) of everything under root; no link is ever followed.

    os.fwalk opens each directory by descriptor and checks it is the one it listed,
    so a directory swapped for a link mid-walk is not entered either.
    """
    for dirpath, dirnames, filenames, dirfd in os.fwalk(root, follow_symlinks=False):
        base = Path(dirpath).relative_to(root)
        for name in sorted((*dirnames, *filenames)):
            yield (base / name).as_posix(), name, dirfd, os.stat(name, dir_fd=dirfd, follow_symlinks=False)


def _refuse_odd(path: Path, odd: list[str]) -> None:
    if odd:
        shown = ", ".join(odd[:10]) + (f" and {len(odd) - 10} more" if len(odd) > 10 else "")
        raise InvalidModelDir(f"{path} contains {shown}; only regular files and directories are imported, "
                              "and links are never followed")


def model_files(path: Path) -> list[Path]:
    """Return every regular file under path, sorted; raise InvalidModelDir naming any link or special file.

    path itself may be a link to a directory (a mount point's alias); what lies inside may not.
    """
    root = path.resolve()
    files, odd = [], []
    for rel, _, _, st in _entries(root):
        kind = _odd_kind(st.st_mode)
        if kind:
            odd.append(f"{rel} ({kind})")
        elif stat.S_ISREG(st.st_mode):
            files.append(root / rel)
    _refuse_odd(path, odd)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def tree_size(path: Path) -> int:
    """Return the bytes of the regular files under path (refusing links and special files, as model_files)."""
    return sum(f.lstat().st_size for f in model_files(path))


def _open_source(name: str, dirfd: int, rel: str):
    """Open a source file for reading without following a link or blocking on a FIFO that replaced it."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidModelDir(f"{rel} became a symbolic link during the import; links are never followed")
        raise
    kind = _odd_kind(os.fstat(fd).st_mode)
    if kind:
        os.close(fd)
        raise InvalidModelDir(f"{rel} became a {kind} during the import; only regular files are imported")
    return os.fdopen(fd, "rb")


def _create(target: Path):
    """Create a new store file (never through a link, never one that exists) with the store's permissions."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, "wb")


def make_store_dir(path: Path, *, exist_ok: bool = True) -> None:
    """Create a directory (and missing parents) with the store's permissions, whatever the umask."""
    path.mkdir(parents=True, exist_ok=exist_ok)
    os.chmod(path, DIR_MODE)


def copy_and_hash(src: Path, dst: Path, progress: Callable[[int, int], None] = lambda done, total: None) -> dict:
    """Copy src into dst (which must not exist), returning {relative path: sha256} of the bytes written.

    Links and special files in src are refused (before anything is written, and again
    if one appears mid-copy); what is written gets FILE_MODE and DIR_MODE.
    """
    root = src.resolve()
    total = tree_size(root) or 1
    done = 0
    manifest = {}
    make_store_dir(dst, exist_ok=False)
    for rel, name, dirfd, st in _entries(root):
        if stat.S_ISDIR(st.st_mode):
            make_store_dir(dst / rel, exist_ok=False)
            continue
        _refuse_odd(src, [f"{rel} ({kind})" for kind in [_odd_kind(st.st_mode)] if kind])
        digest = hashlib.sha256()
        unsynced = 0
        with _open_source(name, dirfd, rel) as fin, _create(dst / rel) as fout:
            while chunk := fin.read(HASH_CHUNK):
                digest.update(chunk)
                fout.write(chunk)
                done += len(chunk)
                unsynced += len(chunk)
                if unsynced >= SYNC_EVERY:
                    fout.flush()
                    os.fdatasync(fout.fileno())
                    unsynced = 0
                progress(done, total)
            fout.flush()
            os.fsync(fout.fileno())
        manifest[rel] = digest.hexdigest()
    return manifest


def hash_dir(path: Path) -> dict:
    """Return {relative path: sha256} of every file under path (links and special files raise InvalidModelDir)."""
    manifest = {}
    root = path.resolve()
    for f in model_files(root):
        digest = hashlib.sha256()
        with f.open("rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                digest.update(chunk)
        manifest[f.relative_to(root).as_posix()] = digest.hexdigest()
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


def in_store(store: Path, *parts: str) -> Path:
    """Return store/parts resolved, or raise OutsideStore unless that lies strictly inside the store.

    Resolving first means neither '..', an absolute part nor a link planted in the
    store can make a copy, rename or delete land anywhere else.
    """
    root = store.resolve()
    target = root.joinpath(*parts).resolve()
    if root not in target.parents:
        shown = "/".join(parts) or "(nothing)"
        raise OutsideStore(f"{shown} resolves to {target}, which is not inside the model store {root}")
    return target


def remove_in_store(store: Path, *parts: str) -> None:
    """Delete store/parts (a file or a tree) after checking it lies inside the store; a missing one is fine."""
    target = in_store(store, *parts)
    if target.is_dir():
        shutil.rmtree(target)  # rmtree removes links it meets, never what they point to
    elif target.exists():
        target.unlink()


def free_bytes(path: Path) -> int:
    """Return the bytes an unprivileged writer may still use on path's file system."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


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
