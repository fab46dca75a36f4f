"""Where a variant came from and what it descends from, and the signed manifest that binds both to its files.

Provenance is what the files themselves state (README front matter, config.json, a GGUF's general.* metadata)
plus what the box saw (the source path, the original format and hash, the importing admin). Parents are other
variants with a relation. At import the box signs a manifest of the stored files' hashes, the provenance and
the parents with its audit key; the signature is a ledger event, and the loader checks it again before a deploy.
"""
from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.canonical import canonical_bytes
from audit.keys import sign
from audit.models import AuditEvent, SigningKey

from .gguf_facts import origin
from .modelfiles import InvalidModelDir
from .models import Relation
from .names import InvalidName, check_name

MANIFEST_STATEMENT = "llm-appliance variant manifest v1"
MAX_FRONT_MATTER = 64 * 1024
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")  # a Hugging Face repository id: owner/name


class InvalidParent(ValueError):
    """A parent given at import is malformed, unknown or has an unknown relation; the message says which."""


def parse_parent(spec: str) -> dict:
    """Return {"name", "relation"} from "NAME:RELATION" (e.g. deepseek-r1:distilled_from), validated."""
    name, sep, relation = spec.partition(":")
    if not sep:
        raise InvalidParent(f"parent {spec!r} must be NAME:RELATION, relation one of {', '.join(Relation.values)}")
    try:
        check_name(name, field="parent variant name")
    except InvalidName as exc:
        raise InvalidParent(str(exc)) from None
    if relation not in Relation.values:
        raise InvalidParent(f"parent {name}: unknown relation {relation!r}; expected one of "
                            f"{', '.join(Relation.values)}")
    return {"name": name, "relation": relation}


def front_matter(readme: Path) -> dict:
    """Return the simple `key: value` and `key: [a, b]` / list entries of a model card's YAML front matter."""
    if not readme.is_file():
        return {}
    text = readme.read_bytes()[:MAX_FRONT_MATTER].decode("utf-8", "replace")
    if not text.startswith("---"):
        return {}
    block = text[3:].split("\n---", 1)[0]
    found: dict = {}
    key = None
    for line in block.splitlines():
        item = re.match(r"^\s*-\s+(.+?)\s*$", line)
        if item and key:
            found.setdefault(key, [])
            if isinstance(found[key], list):
                found[key].append(item.group(1).strip("'\""))
            continue
        pair = re.match(r"^([A-Za-z_][\w-]*):\s*(.*?)\s*$", line)
        if pair:
            key, value = pair.group(1), pair.group(2).strip("'\"")
            if value:
                found[key] = value
    return {k: v for k, v in found.items() if k in ("license", "license_name", "base_model", "base_model_relation",
                                                        "library_name", "pipeline_tag")}


def from_hf_dir(path: Path, config: dict) -> dict:
    """Return the provenance a Hugging Face directory states: license and upstream, from its card and config."""
    found: dict = {"format": "safetensors"}
    card = front_matter(path / "README.md")
    if "license" in card:
        found["license"] = card["license"]
    if "base_model" in card:
        found["base_model"] = card["base_model"]
    name = config.get("_name_or_path") or config.get("_model_name_or_path")
    if isinstance(name, str) and _REPO.match(name):
        found["upstream"] = {"repository": name}
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and isinstance(quant.get("quant_method"), str):
        found["quantization"] = quant["quant_method"]
    return found


def from_gguf(facts: dict, sha256: str) -> dict:
    """Return the provenance of a converted GGUF: its hash, quantization, and what its metadata states."""
    stated = origin(facts)
    found = {"format": "gguf", "sha256": sha256, "quantization": facts["file_type"],
             "tensor_types": facts["tensor_types"], "gguf_metadata": facts["metadata"]}
    if "license" in stated:
        found["license"] = stated["license"]
    upstream = {k: stated[k] for k in ("source.huggingface.repository", "source.url", "repo_url", "url") if k in stated}
    if upstream:
        found["upstream"] = upstream
    if "base_models" in stated:
        found["base_model"] = stated["base_models"]
    return found


def merge(requested: dict, found: dict) -> dict:
    """Return the provenance to record: what the files state, under what the importer was told (which wins)."""
    merged = {**found, **requested}
    if "upstream" in found and "upstream" in requested:
        merged["upstream"] = {**found["upstream"], **requested["upstream"]}
    return merged


def check_expected_hash(provenance: dict) -> None:
    """Refuse an import whose original file's hash is not the one its source promised (a registry digest)."""
    expected, actual = provenance.get("expected_sha256"), provenance.get("sha256")
    if expected and actual and expected != actual:
        raise InvalidModelDir(f"the source file's sha256 is {actual}, but {provenance.get('expected_from', 'its source')}"
                              f" promised {expected}; not imported")


# ---- the signed manifest ---------------------------------------------------------------------------------

def manifest_document(name: str, files: dict, provenance: dict, parents: list) -> dict:
    """Return the statement the box signs for a variant: its files' hashes, provenance and parents."""
    return {"statement": MANIFEST_STATEMENT, "variant": name, "files": dict(sorted(files.items())),
            "provenance": provenance, "parents": parents}


def document_digest(document: dict) -> str:
    return hashlib.sha256(canonical_bytes(document)).hexdigest()


def sign_manifest(document: dict) -> dict:
    """Return the ledger details of a signed manifest: the document's digest, the signature and the key."""
    fingerprint, signature = sign(canonical_bytes(document))
    return {"manifest_sha256": document_digest(document), "key": fingerprint,
            "signature": base64.b64encode(signature).decode(), "document": document}


def verify_manifest(name: str, files: dict, provenance: dict, parents: list) -> str | None:
    """Return why a variant's latest signed manifest does not cover what is stored now, or None when it does."""
    event = (AuditEvent.objects.filter(action="variant.manifest", target=name, outcome="ok").order_by("-seq").first())
    if event is None:
        return f"variant {name} has no signed manifest in the ledger"
    details = event.details
    document = manifest_document(name, files, provenance, parents)
    if details.get("manifest_sha256") != document_digest(document):
        return (f"variant {name}'s files, provenance or parents differ from its signed manifest "
                f"(ledger event {event.seq})")
    key = SigningKey.objects.filter(fingerprint=details.get("key")).first()
    if key is None:
        return f"variant {name}'s manifest is signed by unknown key {details.get('key')}"
    try:
        Ed25519PublicKey.from_public_bytes(bytes(key.public_key)).verify(
            base64.b64decode(details.get("signature", "")), canonical_bytes(document))
    except (InvalidSignature, ValueError):
        return f"variant {name}'s manifest signature does not verify (ledger event {event.seq})"
    return None
