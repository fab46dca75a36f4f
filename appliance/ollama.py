"""Find the GGUF behind an Ollama model reference in an Ollama models directory (manifest → blobs).

Ollama keeps manifests/<host>/<namespace>/<model>/<tag> (an OCI-style JSON manifest) and blobs/sha256-<hex>.
The model layer is a GGUF file; its digest is what the import must hash to, and the license layer, when
present, is recorded with the provenance.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from django.conf import settings

from .modelfiles import InvalidModelDir, OutsideStore, in_store, validate_gguf_file
from .names import check_ollama_ref

MODEL_LAYER = "application/vnd.ollama.image.model"
LICENSE_LAYER = "application/vnd.ollama.image.license"
MAX_MANIFEST_BYTES = 1 * 2**20
MAX_LICENSE_BYTES = 1 * 2**20


def models_dir() -> Path:
    """Return Ollama's models directory: OLLAMA_MODELS, else ~/.ollama/models."""
    return Path(settings.OLLAMA_MODELS or os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def _blob(root: Path, digest) -> Path:
    if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71 or \
            any(c not in "0123456789abcdef" for c in digest[7:]):
        raise InvalidModelDir(f"the Ollama manifest names a blob digest {str(digest)[:80]!r}, not sha256:<64 hex>")
    return in_store(root, "blobs", digest.replace(":", "-"))


def resolve(ref: str, root: Path | None = None) -> tuple[Path, dict]:
    """Return (the GGUF blob's path, provenance) of an Ollama reference; raise InvalidModelDir saying what is wrong."""
    host, namespace, model, tag = check_ollama_ref(ref)
    root = (root or models_dir()).resolve()
    try:
        manifest_path = in_store(root, "manifests", host, namespace, model, tag)
    except OutsideStore as exc:
        raise InvalidModelDir(str(exc)) from None
    if not manifest_path.is_file():
        raise InvalidModelDir(f"Ollama has no model {ref} in {root} (no manifest {manifest_path})")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise InvalidModelDir(f"{manifest_path} is too large to be an Ollama manifest")
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidModelDir(f"{manifest_path} is not valid JSON ({exc})") from None
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list):
        raise InvalidModelDir(f"{manifest_path} has no layers list")
    models = [layer for layer in layers if isinstance(layer, dict) and layer.get("mediaType") == MODEL_LAYER]
    if len(models) != 1:
        raise InvalidModelDir(f"{manifest_path} has {len(models)} model layers ({MODEL_LAYER}); expected one")
    blob = _blob(root, models[0].get("digest"))
    validate_gguf_file(blob)
    provenance = {
        "ollama": {"ref": f"{namespace}/{model}:{tag}" if host == "registry.ollama.ai" else f"{host}/{namespace}/{model}:{tag}",
                   "models_dir": str(root), "manifest_sha256": hashlib.sha256(raw).hexdigest(),
                   "blob": models[0]["digest"]},
        "expected_sha256": models[0]["digest"].removeprefix("sha256:"),
        "expected_from": f"the Ollama manifest of {ref}",
    }
    licenses = [layer for layer in layers if isinstance(layer, dict) and layer.get("mediaType") == LICENSE_LAYER]
    if licenses:
        text_path = _blob(root, licenses[0].get("digest"))
        if text_path.is_file() and not text_path.is_symlink():
            text = text_path.read_bytes()[:MAX_LICENSE_BYTES].decode("utf-8", "replace")
            first = next((line.strip() for line in text.splitlines() if line.strip()), "")
            if first:
                provenance["license"] = first[:100]
    return blob, provenance
