"""The Ed25519 key that signs checkpoints: created on first use, encrypted at rest, rotated by event."""
import base64
import secrets
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings
from django.db import router, transaction

from audit import ledger
from audit.canonical import canonical_bytes
from audit.kek import derived_key
from audit.models import AuditEvent, SigningKey
from audit.verifier import ROTATION_STATEMENT, fingerprint, format_checkpoint_body, key_id


def _encrypt_private(private: Ed25519PrivateKey, fp: str) -> bytes:
    """Return the private key encrypted under the signing-key subkey, bound to its fingerprint."""
    raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(derived_key("signing-key")).encrypt(nonce, raw, fp.encode())


_private_cache: dict[str, Ed25519PrivateKey] = {}


def private_key(key: SigningKey) -> Ed25519PrivateKey:
    """Return the decrypted private half of key."""
    if key.fingerprint not in _private_cache:
        blob = bytes(key.private_key_encrypted)
        raw = AESGCM(derived_key("signing-key")).decrypt(blob[:12], blob[12:], key.fingerprint.encode())
        _private_cache[key.fingerprint] = Ed25519PrivateKey.from_private_bytes(raw)
    return _private_cache[key.fingerprint]


def _new_key(origin: str) -> tuple[SigningKey, Ed25519PrivateKey]:
    """Return a fresh, unsaved signing key and its private half."""
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    fp = fingerprint(public)
    row = SigningKey(created_at=datetime.now(timezone.utc), origin=origin, fingerprint=fp,
                     public_key=public, private_key_encrypted=_encrypt_private(private, fp))
    return row, private


def active_key() -> SigningKey:
    """Return the signing key in use, creating the box's first one if there is none."""
    key = SigningKey.objects.order_by("-id").first()
    if key is not None:
        return key
    using = router.db_for_write(SigningKey)
    with transaction.atomic(using=using):
        ledger.lock(using)  # two processes starting at once must not both create a first key
        key = SigningKey.objects.using(using).order_by("-id").first()
        if key is None:
            key, _ = _new_key(settings.AUDIT_ORIGIN)
            key.save(using=using)
            ledger.append("audit.key_created", actor="system:audit", target=key.fingerprint,
                          details={"origin": key.origin,
                                   "public_key": base64.b64encode(bytes(key.public_key)).decode()})
            _pin(key.fingerprint)
    return key


def _pin(fp: str) -> None:
    """Record fp in this box's pin file, which live verification trusts over the database."""
    path = Path(settings.AUDIT_PUBKEY_PIN_FILE)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(fp + "\n")


def pinned_fingerprints() -> set[str]:
    """Return the fingerprints this box created or rotated to (empty when it has no pin file)."""
    path = Path(settings.AUDIT_PUBKEY_PIN_FILE)
    if not path.exists():
        return set()
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def sign(message: bytes, key: SigningKey | None = None) -> tuple[str, bytes]:
    """Return (fingerprint, Ed25519 signature) of message under key (the active key by default)."""
    key = key or active_key()
    return key.fingerprint, private_key(key).sign(message)


def signed_note(text: str, key: SigningKey) -> str:
    """Return text as a C2SP signed note, signed by key under the key's origin as its name."""
    signature = private_key(key).sign(text.encode("utf-8"))
    blob = key_id(key.origin, bytes(key.public_key)) + signature
    return f"{text}\n\u2014 {key.origin} {base64.b64encode(blob).decode()}\n"


def checkpoint_note(size: int, root: bytes, time: int, key: SigningKey) -> str:
    """Return the signed checkpoint note for a tree of size with root at time."""
    return signed_note(format_checkpoint_body(key.origin, size, root, time), key)


def rotate(actor: str) -> SigningKey:
    """Replace the signing key, recording the change as a ledger event signed by the old key."""
    using = router.db_for_write(SigningKey)
    with transaction.atomic(using=using):
        ledger.lock(using)
        old = active_key()
        new, _ = _new_key(old.origin)
        statement = {
            "statement": ROTATION_STATEMENT, "origin": old.origin, "time": int(new.created_at.timestamp()),
            "old_fingerprint": old.fingerprint, "new_fingerprint": new.fingerprint,
            "new_public_key": base64.b64encode(bytes(new.public_key)).decode(),
        }
        signature = private_key(old).sign(canonical_bytes(statement))
        ledger.append("audit.key_rotated", actor=actor, target=new.fingerprint,
                      details={**statement, "signature": base64.b64encode(signature).decode()})
        new.save(using=using)
        _pin(new.fingerprint)
    return new


def keys_document() -> dict:
    """Return every public key and signed rotation, as exports carry them in keys.json."""
    keys = [{"name": k.origin, "fingerprint": k.fingerprint,
             "public_key": base64.b64encode(bytes(k.public_key)).decode(),
             "created_at": k.created_at.isoformat()} for k in SigningKey.objects.order_by("id")]
    # Each rotation as it was signed: the ledger adds the writing node to every event's details, the signed
    # statement never held it.
    rotations = [{k: v for k, v in details.items() if k != "node"} for details in AuditEvent.objects.filter(
        action="audit.key_rotated").order_by("seq").values_list("details", flat=True)]
    return {"keys": keys, "rotations": rotations}
