"""Import one GGUF file (llama.cpp, Ollama): hash it, convert it in a child process, keep the result.

The worker never loads torch: the conversion (transformers' GGUF loader, dequantized into safetensors) runs
as `python -m appliance.gguf_convert` in its own process group, killed when the import loses its lease or
runs past APPLIANCE_GGUF_TIMEOUT_S. The original file is read twice (hashed, then converted) and never
copied into the store; its SHA-256, quantization type and metadata become the variant's provenance.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings

from .gguf_facts import read_facts
from .modelfiles import DIR_MODE, FILE_MODE, HASH_CHUNK, InvalidModelDir, make_store_dir
from .provenance import from_gguf

REFUSED_EXIT = 3  # appliance.gguf_convert's exit status for a file it refuses
POLL_S = 0.5
# Tokenizer, config and template on top of the dequantized weights (SmolLM2's tokenizer.json is 3.5 MB).
SIDE_FILES_BYTES = 64 * 2**20


class ConversionFailed(RuntimeError):
    """The conversion child failed for a reason other than a refusal; the message carries its last words."""


def planned_size(facts: dict) -> int:
    """Return the bytes the converted directory will take (bf16 weights plus tokenizer and configs)."""
    return facts["dequantized_bytes"] + SIDE_FILES_BYTES


def hash_file(path: Path, progress) -> str:
    """Return the SHA-256 of path, reporting (bytes done, total) as it reads."""
    total = path.stat().st_size or 1
    digest, done = hashlib.sha256(), 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            progress(done, total)
    return digest.hexdigest()


def convert(source: Path, work: Path, *, renew) -> dict:
    """Run the conversion child into work (created here); return its report or raise with its reason."""
    make_store_dir(work, exist_ok=False)
    # The child's reports and its log live in the attempt's directory, so a discarded attempt takes them along.
    out_path, log_path = work / ".convert.out", work / ".convert.log"
    cmd = [sys.executable, "-m", "appliance.gguf_convert", str(source), str(work)]
    deadline = time.monotonic() + settings.GGUF_TIMEOUT_S
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "appliance.settings", "TQDM_DISABLE": "1"}
    with out_path.open("wb") as stdout, log_path.open("wb") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, cwd=settings.BASE_DIR,
                                start_new_session=True, env=env)
        try:
            while proc.poll() is None:
                renew(_last_phase(out_path))  # raises LeaseLost when the import was taken away: killed below
                if time.monotonic() >= deadline:
                    raise ConversionFailed(f"the GGUF conversion ran past {settings.GGUF_TIMEOUT_S} s "
                                           "(APPLIANCE_GGUF_TIMEOUT_S) and was stopped")
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    reports = _reports(out_path)
    last_words = log_path.read_text(errors="replace")[-4000:]
    out_path.unlink()
    log_path.unlink()
    report = reports[-1] if reports else {}
    if proc.returncode == REFUSED_EXIT and "refused" in report:
        raise InvalidModelDir(report["refused"])
    if proc.returncode != 0 or "done" not in report:
        if "No space left on device" in last_words:
            raise OSError(errno.ENOSPC, "No space left on device (while writing the converted weights)")
        lines = last_words.strip().splitlines()
        raise ConversionFailed(f"the GGUF conversion failed: {(lines[-1] if lines else f'exit status {proc.returncode}')[:500]}")
    _store_modes(work)
    _drop_quantization_config(work / "config.json")
    return report["done"]


def _reports(path: Path) -> list[dict]:
    """Return the JSON reports the child has written so far (a line still being written is left out)."""
    reports = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            reports.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in reports if isinstance(r, dict)]


def _last_phase(path: Path) -> str:
    return next((r["phase"] for r in reversed(_reports(path)) if "phase" in r), "starting")


def _store_modes(root: Path) -> None:
    """Give what the child wrote the store's own permissions (it wrote with its umask)."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, DIR_MODE)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), FILE_MODE)


def _drop_quantization_config(config_path: Path) -> None:
    """Remove the GGUF quantization entry transformers leaves in the config: the stored weights are plain."""
    config = json.loads(config_path.read_text())
    if "quantization_config" in config:
        del config["quantization_config"]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def facts_and_provenance(source: Path, progress) -> tuple[dict, dict]:
    """Return the file's facts and the provenance that hashing it establishes."""
    facts = read_facts(source)
    sha256 = hash_file(source, progress)
    return facts, from_gguf(facts, sha256)
