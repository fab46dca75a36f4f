"""Hugging Face directories through a live worker: a sharded checkpoint written by save_pretrained(max_shard_size=…)
imported with its model card's license and a parent, deployed and answering; an index that lies refused; an FP8
block-quantized checkpoint imported, then refused at deploy on a box that cannot run FP8, saying what would."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from appliance import fp8
from tests.hostile.probes import shell
from tests.livebox import ROOT

# What the importer makes of a directory, not what the database or broker can change: CI runs it once.
pytestmark = [pytest.mark.e2e, pytest.mark.backend_neutral]

FP8_SCHEME = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def manage(box, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=box.env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sharded(box, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = box.demo_dir / "demo-distilled"
    out = tmp_path_factory.mktemp("hf") / "distilled-sharded"
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).save_pretrained(out, max_shard_size="500KB")
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    shutil.copy(source / "generation_config.json", out)
    (out / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: acme/original-moe\n---\n# Distilled\n")
    return out


@pytest.fixture(scope="module")
def parent(box) -> str:
    manage(box, "import_model", str(box.demo_dir / "demo-moe"), "--name", "hf-parent-moe", "--kind", "moe", "--wait")
    return "hf-parent-moe"


def test_a_sharded_checkpoint_imports_with_its_card_and_parent_and_answers(box, sharded, parent):
    result = manage(box, "import_model", str(sharded), "--name", "hf-sharded", "--kind", "distilled",
                    "--parent", f"{parent}:distilled_from", "--wait")
    assert result.returncode == 0, result.stderr
    found = shell(box, """
import json
from appliance.models import ModelVariant
v = ModelVariant.objects.get(name="hf-sharded")
print(json.dumps({"provenance": v.provenance, "parents": v.parents, "files": sorted(v.manifest)}))
""")
    assert found["parents"] == [{"name": parent, "relation": "distilled_from"}]
    assert found["provenance"]["license"] == "apache-2.0" and found["provenance"]["base_model"] == "acme/original-moe"
    assert "model.safetensors.index.json" in found["files"]
    assert len([f for f in found["files"] if f.startswith("model-") and f.endswith(".safetensors")]) >= 2
    deployed = manage(box, "deploy", "hf-sharded", "--wait")
    assert deployed.returncode == 0, deployed.stderr
    client = openai.OpenAI(base_url=f"{box.url}/v1", api_key=box.new_key("hf"), max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="hf-sharded", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens >= 1
    manage(box, "undeploy", "hf-sharded")


def test_an_index_missing_a_shard_is_refused_at_import(box, sharded, tmp_path):
    lying = Path(shutil.copytree(sharded, tmp_path / "lying"))
    gone = sorted(lying.glob("model-*.safetensors"))[-1]
    gone.unlink()
    result = manage(box, "import_model", str(lying), "--name", "hf-lying", "--kind", "distilled", "--wait")
    assert result.returncode != 0
    assert f"names shard {gone.name!r}, which is missing" in result.stderr


def fp8_copy(source: Path, out: Path) -> Path:
    """Write source's model as DeepSeek-V3 stores its FP8 checkpoints: e4m3 weights, a float32 scale per block."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out)
    tensors = {}
    for name, tensor in load_file(out / "model.safetensors").items():
        if tensor.ndim == 2 and name.endswith("proj.weight"):
            tensors[name] = tensor.to(torch.float8_e4m3fn)
            rows, cols = (math.ceil(n / 128) for n in tensor.shape)
            tensors[name.removesuffix("weight") + "weight_scale_inv"] = torch.ones(rows, cols)
        else:
            tensors[name] = tensor
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": FP8_SCHEME}, indent=2))
    return out


def test_an_fp8_checkpoint_is_recognised_and_refused_at_deploy_where_fp8_cannot_run(box, tmp_path):
    source = fp8_copy(box.demo_dir / "demo-dense", tmp_path / "dense-fp8")
    imported = manage(box, "import_model", str(source), "--name", "dense-fp8", "--kind", "dense", "--wait")
    assert imported.returncode == 0, imported.stderr
    quantization = shell(box, "import json\nfrom appliance.models import ModelVariant\n"
                              "print(json.dumps(ModelVariant.objects.get(name='dense-fp8').provenance))")
    assert quantization["quantization"] == "fp8"
    # The test runs on the box's own machine: what the box decides is what fp8 says for this machine's device.
    refusal = fp8.deploy_refusal({"quantization_config": FP8_SCHEME}, fp8.serving_device("auto"))
    deployed = manage(box, "deploy", "dense-fp8", "--wait")
    if refusal is None:  # GPUs of compute capability 8.9 or newer: FP8 is not what stands in the way
        assert "FP8 block-quantized" not in deployed.stderr
    else:
        assert deployed.returncode != 0
        assert f"dense-fp8 failed to load: refused: {refusal}" in deployed.stderr
