"""The box's key-encryption key (KEK) and the purpose-bound keys derived from it.

One 32-byte KEK (APPLIANCE_AUDIT_KEK, or a 0600 file under APPLIANCE_HOME) is the root; HKDF
derives a separate key for each purpose, so the digest secret, the transcript wrapping key and
the signing-key encryption never share key material. Boxes that share a database must be given
the same KEK, or their digests and transcripts would not agree.
"""
import base64
import os
import secrets
from functools import lru_cache
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings


def kek() -> bytes:
    """Return the 32-byte key-encryption key, creating its 0600 file on first use."""
    value = getattr(settings, "AUDIT_KEK", "")
    source = ("env", value) if value else ("file", str(settings.AUDIT_KEK_FILE))
    if source not in _kek_cache:
        if value:
            _kek_cache[source] = _decode_kek(value, "APPLIANCE_AUDIT_KEK")
        else:
            path = Path(source[1])
            if not path.exists():
                _create_kek_file(path)
            _kek_cache[source] = _decode_kek(path.read_text().strip(), str(path))
    return _kek_cache[source]


_kek_cache: dict[tuple[str, str], bytes] = {}


def _create_kek_file(path: Path) -> None:
    """Write a new random KEK to path, atomically, readable by the owner only."""
    # Written aside and linked into place, so a process starting at the same moment sees either
    # no file or a complete one, never an empty file it would refuse.
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    try:
        os.link(temp, path)
    except FileExistsError:
        pass  # another process won the race; everyone reads its key
    finally:
        temp.unlink()


def _decode_kek(text: str, source: str) -> bytes:
    """Return the KEK encoded in text, or raise ValueError naming where it came from."""
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"{source} must hold 32 bytes in base64 (e.g. `openssl rand -base64 32`)")
    return raw


@lru_cache(maxsize=16)
def _derive(root: bytes, purpose: str) -> bytes:
    """Return the 32-byte subkey of root for purpose."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"llm-appliance audit " + purpose.encode()).derive(root)


def derived_key(purpose: str) -> bytes:
    """Return the KEK's subkey for one purpose ("digest", "transcripts", "signing-key")."""
    return _derive(kek(), purpose)


