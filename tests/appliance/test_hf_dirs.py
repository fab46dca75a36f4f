"""Hugging Face directories as they come: sharded safetensors with an index that must agree with its shards,
chat templates in tokenizer_config.json or chat_template.jinja, provenance from the model card, FP8 configs.

Real files throughout: the sharded directories are written by transformers' save_pretrained(max_shard_size=…).
"""
import json
import shutil
from pathlib import Path

import pytest

from appliance import fp8
from appliance.modelfiles import summarize, validate_model_dir
from appliance.provenance import InvalidParent, from_hf_dir, parse_parent
from appliance.weightcheck import InvalidWeights, check_model_dir
from tests.weightlies import read_safetensors, write_safetensors


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, demo_dir) -> Path:
    """Return demo-dense re-saved by save_pretrained in shards of at most 1 MB, with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharded") / "dense-sharded"
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "demo-dense", dtype=torch.float32)
    model.save_pretrained(out, max_shard_size="1MB")
    AutoTokenizer.from_pretrained(demo_dir / "demo-dense").save_pretrained(out)
    shutil.copy(demo_dir / "demo-dense" / "generation_config.json", out / "generation_config.json")
    return out


@pytest.fixture
def copy(sharded, tmp_path) -> Path:
    return Path(shutil.copytree(sharded, tmp_path / "model"))


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("model-*.safetensors"))


def refused(path: Path) -> str:
    with pytest.raises(InvalidWeights) as info:
        check_model_dir(path)
    return str(info.value)


def test_a_sharded_directory_is_accepted_and_counted_like_the_single_file(sharded, demo_dir):
    assert len(shards(sharded)) > 2 and (sharded / "model.safetensors.index.json").is_file()
    check_model_dir(sharded)
    whole = summarize(demo_dir / "demo-dense", validate_model_dir(demo_dir / "demo-dense"))
    parts = summarize(sharded, validate_model_dir(sharded))
    assert parts.params_total == whole.params_total and parts.architecture == whole.architecture


def test_an_index_naming_a_shard_that_is_missing_is_refused(copy):
    gone = shards(copy)[1]
    gone.unlink()
    assert f"model.safetensors.index.json names shard {gone.name!r}, which is missing" in refused(copy)


def test_a_shard_the_index_does_not_name_is_refused(copy):
    header, data = read_safetensors(shards(copy)[0])
    name, info = next(iter((k, v) for k, v in header.items() if k != "__metadata__"))
    begin, end = info["data_offsets"]
    write_safetensors(copy / "model-extra.safetensors",
                      {"extra.weight": {**info, "data_offsets": [0, end - begin]}}, data[begin:end])
    assert ("model.safetensors.index.json does not name model-extra.safetensors, which lies beside it"
            in refused(copy))


def test_an_index_that_moves_a_tensor_to_another_shard_is_refused(copy):
    index_path = copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    held: dict[str, list[str]] = {}
    for name, shard in index["weight_map"].items():
        held.setdefault(shard, []).append(name)
    first = next(shard for shard, names in sorted(held.items()) if len(names) > 1)  # it stays in the index
    second = next(shard for shard in sorted(held) if shard != first)
    tensor = held[first][0]
    index["weight_map"][tensor] = second
    index_path.write_text(json.dumps(index))
    assert f"places tensor {tensor} in {second!r}, which does not hold it" in refused(copy)


def test_the_chat_template_is_taken_from_tokenizer_config_or_chat_template_jinja(copy):
    from transformers import AutoTokenizer

    template = (copy / "chat_template.jinja").read_text()
    messages = [{"role": "user", "content": "hi"}]
    from_file = AutoTokenizer.from_pretrained(copy).apply_chat_template(messages, tokenize=False)
    (copy / "chat_template.jinja").unlink()
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    from_config = AutoTokenizer.from_pretrained(copy).apply_chat_template(messages, tokenize=False)
    assert from_config == from_file and "<|im_start|>user\nhi<|im_end|>" in from_file


def test_the_engine_stops_at_every_eos_id_of_generation_config(copy):
    from inference.engine import Engine, EngineConfig

    generation = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [1, 3]}))
    engine = Engine(copy, EngineConfig(device="cpu", telemetry=False, threads=1))
    try:
        assert {1, 3} <= engine.eos_token_ids
    finally:
        engine.close()


def test_provenance_comes_from_the_model_card_and_config(copy):
    (copy / "README.md").write_text("---\nlicense: mit\nbase_model:\n  - deepseek-ai/DeepSeek-R1\n"
                                    "pipeline_tag: text-generation\n---\n# A card\n")
    config = {**json.loads((copy / "config.json").read_text()), "_name_or_path": "acme/dense-distill"}
    found = from_hf_dir(copy, config)
    assert found == {"format": "safetensors", "license": "mit", "base_model": ["deepseek-ai/DeepSeek-R1"],
                     "upstream": {"repository": "acme/dense-distill"}}


def test_a_local_path_in_the_config_is_not_taken_for_an_upstream_repository(copy):
    config = {**json.loads((copy / "config.json").read_text()), "_name_or_path": "/home/me/../models/x"}
    assert "upstream" not in from_hf_dir(copy, config)


@pytest.mark.parametrize("spec, message", [
    ("demo-dense", "must be NAME:RELATION"),
    ("demo-dense:copied_from", "unknown relation 'copied_from'"),
    ("../x:distilled_from", "parent variant name '../x' is refused"),
])
def test_a_malformed_parent_is_refused_naming_what_is_wrong(spec, message):
    with pytest.raises(InvalidParent, match=message.replace("(", r"\(")):
        parse_parent(spec)


DEEPSEEK_FP8 = {"quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                        "weight_block_size": [128, 128]}}


def test_an_fp8_checkpoint_is_refused_on_cpu_and_on_gpus_older_than_ada_saying_what_would_run_it():
    on_cpu = fp8.deploy_refusal(DEEPSEEK_FP8, "cpu")
    assert on_cpu.startswith("this is an FP8 block-quantized checkpoint (FP8 (e4m3, 128×128 blocks")
    assert "serves on CPU" in on_cpu and "compute capability 8.9 or newer" in on_cpu and "H100" in on_cpu
    # GPU capabilities are what torch would report on those cards; this box has no GPU to ask.
    on_a100 = fp8.deploy_refusal(DEEPSEEK_FP8, "cuda", gpus=[("NVIDIA A100-SXM4-80GB", (8, 0))])
    assert "NVIDIA A100-SXM4-80GB (8.0) cannot run it" in on_a100
    assert fp8.deploy_refusal(DEEPSEEK_FP8, "cuda", gpus=[("NVIDIA H200", (9, 0))] * 8) is None


def test_a_config_without_fp8_quantization_is_never_refused_for_it():
    assert fp8.deploy_refusal({"model_type": "llama"}, "cpu") is None
    assert fp8.deploy_refusal({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "cpu") is None
