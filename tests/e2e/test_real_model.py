"""The real model on a live box: the bundled SmolLM2 GGUF imported through the worker (converted to safetensors in
its child process), deployed, and answering sensibly through the official openai client; its greedy answers equal
transformers' own generate on the same stored weights; its provenance is recorded and its manifest signed."""
import json
from pathlib import Path

import openai
import pytest

from appliance import bundled
from tests.hostile.probes import shell

# What the API or the importer makes of a request, not what the database or broker can change: CI runs it once.
pytestmark = [pytest.mark.e2e, pytest.mark.backend_neutral]

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write one sentence about the sea.",
    "What is 2 + 2?",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def client(box):
    return openai.OpenAI(base_url=f"{box.url}/v1", api_key=box.new_key("real-model"), max_retries=0, timeout=120)


def stored(box, name: str) -> dict:
    return shell(box, f"""
import json
from appliance.models import ModelVariant
v = ModelVariant.objects.get(name={name!r})
print(json.dumps({{"store_path": v.store_path, "provenance": v.provenance, "random_weights": v.random_weights,
                  "kind": v.kind, "dtype": v.dtype, "params_total": v.params_total, "files": sorted(v.manifest)}}))
""")


def test_the_real_model_says_paris(client, real_model):
    reply = client.chat.completions.create(
        model=real_model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=MAX_TOKENS, temperature=0)
    assert "Paris" in reply.choices[0].message.content


def test_greedy_answers_equal_transformers_generate_on_the_stored_weights(box, client, real_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = Path(stored(box, real_model)["store_path"])
    tokenizer = AutoTokenizer.from_pretrained(store, local_files_only=True)
    # float32 on CPU, as the box's engine loads it on a machine without a GPU.
    model = AutoModelForCausalLM.from_pretrained(store, dtype=torch.float32, local_files_only=True).eval()
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                            return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        reply = client.chat.completions.create(model=real_model, messages=messages, max_tokens=MAX_TOKENS,
                                               temperature=0)
        assert reply.choices[0].message.content == expected, prompt


def test_the_import_records_the_gguf_hash_quantization_license_and_upstream(box, real_model):
    variant = stored(box, real_model)
    provenance = variant["provenance"]
    assert provenance["format"] == "gguf"
    assert provenance["sha256"] == bundled.GGUF_SHA256
    assert provenance["quantization"] == "Q4_1"
    assert provenance["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert provenance["license"] == "apache-2.0"  # from the GGUF's general.license
    assert provenance["upstream"]["repository"] == bundled.UPSTREAM
    assert provenance["gguf_metadata"]["general.architecture"] == "llama"
    assert provenance["imported_by"].startswith("cli:")
    assert variant["random_weights"] is False and variant["kind"] == "dense"
    assert variant["dtype"] == "BF16" and variant["params_total"] == 134_515_008
    # Dequantized safetensors with the tokenizer and chat template; the GGUF itself is not stored.
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "generation_config.json"} <= set(variant["files"])
    assert not [f for f in variant["files"] if f.endswith(".gguf") or f.startswith(".convert")]
    config = json.loads((Path(variant["store_path"]) / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    generation = json.loads((Path(variant["store_path"]) / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2  # <|im_end|>: a turn ends where the GGUF says


def test_the_signed_manifest_is_a_ledger_event_that_verifies(box, real_model):
    result = shell(box, f"""
import json
from appliance.models import ModelVariant
from appliance.provenance import verify_manifest
from audit.models import AuditEvent
v = ModelVariant.objects.get(name={real_model!r})
event = AuditEvent.objects.filter(action="variant.manifest", target=v.name).order_by("-seq").first()
tampered = dict(v.provenance, license="proprietary")
print(json.dumps({{"intact": verify_manifest(v.name, v.manifest, v.provenance, v.parents),
                  "tampered": verify_manifest(v.name, v.manifest, tampered, v.parents),
                  "files": sorted(event.details["document"]["files"]) == sorted(v.manifest),
                  "sha256": event.details["document"]["provenance"]["sha256"]}}))
""")
    assert result["intact"] is None
    assert "differ from its signed manifest" in result["tampered"]
    assert result["files"] and result["sha256"] == bundled.GGUF_SHA256
