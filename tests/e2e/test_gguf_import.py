"""GGUF files and Ollama models imported through a live worker: an Ollama models directory built here around the
bundled SmolLM2 GGUF (manifest → blob, license layer), a manifest whose digest lies, a GGUF of an architecture
transformers cannot read, and a file that is not a GGUF at all. Each refusal names what is wrong."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import bundled
from tests.hostile.probes import files_under, shell
from tests.livebox import ROOT

# What the API or the importer makes of a request, not what the database or broker can change: CI runs it once.
pytestmark = [pytest.mark.e2e, pytest.mark.backend_neutral]

LICENSE_TEXT = b"Apache License\nVersion 2.0, January 2004\nhttp://www.apache.org/licenses/\n"


def blob_name(data_or_digest) -> str:
    digest = data_or_digest if isinstance(data_or_digest, str) else hashlib.sha256(data_or_digest).hexdigest()
    return f"sha256-{digest}"


def ollama_dir(root: Path, gguf: Path, *, model_digest: str | None = None) -> Path:
    """Lay out an Ollama models directory holding gguf as smollm2:135m, as `ollama pull` leaves it."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True)
    digest = model_digest or bundled.GGUF_SHA256
    try:
        os.link(gguf, blobs / blob_name(digest))  # a hard link: the same bytes, no 98 MB copy
    except OSError:
        shutil.copyfile(gguf, blobs / blob_name(digest))
    (blobs / blob_name(LICENSE_TEXT)).write_bytes(LICENSE_TEXT)
    config = b'{"model_format":"gguf","model_family":"llama"}'
    (blobs / blob_name(config)).write_bytes(config)
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": f"sha256:{hashlib.sha256(config).hexdigest()}", "size": len(config)},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
             "size": gguf.stat().st_size},
            {"mediaType": "application/vnd.ollama.image.license",
             "digest": f"sha256:{hashlib.sha256(LICENSE_TEXT).hexdigest()}", "size": len(LICENSE_TEXT)},
        ],
    }
    where = root / "manifests" / "registry.ollama.ai" / "library" / "smollm2"
    where.mkdir(parents=True)
    (where / "135m").write_text(json.dumps(manifest))
    return root


def manage(box, *args, env=None, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env={**box.env, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def provenance(box, name: str) -> dict:
    return shell(box, f"""
import json
from appliance.models import ModelVariant
v = ModelVariant.objects.get(name={name!r})
print(json.dumps({{"status": v.status, "detail": v.status_detail, "provenance": v.provenance}}))
""")


def incoming(box) -> list[Path]:
    return files_under(box.home / "models" / ".incoming")


def test_an_ollama_model_is_imported_from_its_manifest_and_blob(box, bundled_gguf, tmp_path):
    models = ollama_dir(tmp_path / "ollama", bundled_gguf)
    result = manage(box, "import_model", "--from-ollama", "smollm2:135m", "--name", "ollama-smollm2",
                    "--kind", "dense", "--wait", env={"OLLAMA_MODELS": str(models)})
    assert result.returncode == 0, result.stderr
    assert "ollama-smollm2 ready: 134,515,008 parameters" in result.stdout
    found = provenance(box, "ollama-smollm2")["provenance"]
    assert found["ollama"]["ref"] == "library/smollm2:135m"
    assert found["ollama"]["blob"] == f"sha256:{bundled.GGUF_SHA256}"
    assert found["sha256"] == found["expected_sha256"] == bundled.GGUF_SHA256
    assert found["license"] == "Apache License"  # the license layer's first line names it
    assert found["format"] == "gguf" and found["quantization"] == "Q4_1"
    assert incoming(box) == []
    manage(box, "shell", "--no-imports", "-c",
           "from appliance.actions import do_delete\nfrom appliance.models import ModelVariant\n"
           "do_delete(ModelVariant.objects.get(name='ollama-smollm2'), actor='test')")


def test_an_ollama_blob_whose_bytes_differ_from_its_manifest_digest_is_refused(box, bundled_gguf, tmp_path):
    lying = "0" * 64  # the manifest promises this digest; the blob holds SmolLM2's bytes
    models = ollama_dir(tmp_path / "ollama", bundled_gguf, model_digest=lying)
    result = manage(box, "import_model", "--from-ollama", "smollm2:135m", "--name", "ollama-lies", "--kind",
                    "dense", "--wait", env={"OLLAMA_MODELS": str(models)})
    assert result.returncode != 0
    assert (f"the source file's sha256 is {bundled.GGUF_SHA256}, but the Ollama manifest of smollm2:135m promised "
            f"{lying}; not imported") in result.stderr
    assert provenance(box, "ollama-lies")["status"] == "failed"
    assert incoming(box) == []


def test_an_unknown_ollama_model_and_a_bad_reference_are_refused_by_the_cli(box, bundled_gguf, tmp_path):
    models = ollama_dir(tmp_path / "ollama", bundled_gguf)
    missing = manage(box, "import_model", "--from-ollama", "llama3.2:1b", "--name", "x", "--kind", "dense",
                     env={"OLLAMA_MODELS": str(models)})
    assert missing.returncode != 0 and "Ollama has no model llama3.2:1b in" in missing.stderr
    climbing = manage(box, "import_model", "--from-ollama", "../../etc:passwd", "--name", "x", "--kind", "dense",
                      env={"OLLAMA_MODELS": str(models)})
    assert climbing.returncode != 0 and "is not a valid Ollama name part" in climbing.stderr


def write_gguf(path: Path, architecture: str) -> Path:
    """Write a small, valid GGUF file of architecture (one F32 tensor), as llama.cpp's writer would."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny {architecture}")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_of_an_architecture_transformers_cannot_read_is_refused_naming_it(box, tmp_path):
    source = write_gguf(tmp_path / "tiny-deepseek2.gguf", "deepseek2")
    result = manage(box, "import_model", str(source), "--name", "deepseek2-gguf", "--kind", "moe", "--wait")
    assert result.returncode != 0
    assert "GGUF architecture 'deepseek2' cannot be read by transformers" in result.stderr
    assert "readable: " in result.stderr and "llama" in result.stderr
    assert provenance(box, "deepseek2-gguf")["status"] == "failed"
    assert incoming(box) == []


def test_a_file_that_is_not_a_gguf_is_refused(box, tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"PK\x03\x04 not a gguf at all")
    result = manage(box, "import_model", str(source), "--name", "not-gguf", "--kind", "dense", "--wait")
    assert result.returncode != 0
    assert f"{source} is not a GGUF file (it does not start with the GGUF magic)" in result.stderr
