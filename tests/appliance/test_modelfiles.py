import json
import shutil

import pytest

from appliance.modelfiles import (
    InvalidModelDir,
    copy_and_hash,
    hash_dir,
    manifest_mismatches,
    summarize,
    validate_model_dir,
)


@pytest.fixture
def dense(tmp_path, demo_dir):
    target = tmp_path / "dense"
    shutil.copytree(demo_dir / "demo-dense", target)
    return target


def test_it_accepts_a_demo_model(dense):
    assert validate_model_dir(dense)["model_type"] == "llama"


def test_it_rejects_a_missing_directory(tmp_path):
    with pytest.raises(InvalidModelDir, match="is not a directory"):
        validate_model_dir(tmp_path / "nowhere")


def test_it_rejects_a_directory_without_config(dense):
    (dense / "config.json").unlink()
    with pytest.raises(InvalidModelDir, match="no config.json"):
        validate_model_dir(dense)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt", "sub/model.pth"])
def test_it_rejects_pickle_weights(dense, name):
    (dense / name).parent.mkdir(exist_ok=True)
    (dense / name).write_bytes(b"\x80\x04")
    with pytest.raises(InvalidModelDir, match="pickle") as info:
        validate_model_dir(dense)
    assert name in str(info.value)


def test_it_rejects_remote_code(dense):
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    with pytest.raises(InvalidModelDir, match="auto_map"):
        validate_model_dir(dense)


def test_it_rejects_a_directory_without_weights(dense):
    for f in dense.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(InvalidModelDir, match="no \\*.safetensors"):
        validate_model_dir(dense)


def test_it_rejects_a_config_that_is_not_json(dense):
    (dense / "config.json").write_text("{oops")
    with pytest.raises(InvalidModelDir, match="not valid JSON"):
        validate_model_dir(dense)


def test_copy_hashes_what_it_wrote(dense, tmp_path):
    manifest = copy_and_hash(dense, tmp_path / "copy")
    assert manifest == hash_dir(dense) == hash_dir(tmp_path / "copy")
    assert "config.json" in manifest


def test_mismatches_name_changed_missing_and_extra_files(dense):
    manifest = hash_dir(dense)
    (dense / "config.json").write_text("{}")
    (dense / "generation_config.json").unlink()
    (dense / "extra.txt").write_text("x")
    problems = " | ".join(manifest_mismatches(manifest, hash_dir(dense)))
    assert "config.json has changed" in problems
    assert "generation_config.json is missing" in problems
    assert "extra.txt is not in the manifest" in problems


def test_summary_counts_match_the_loaded_model(demo_dir):
    from transformers import AutoModelForCausalLM

    for name in ("demo-moe", "demo-distilled", "demo-dense"):
        path = demo_dir / name
        summary = summarize(path, validate_model_dir(path))
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        loaded = sum(p.numel() for p in model.parameters())
        assert summary.params_total == loaded, name
        assert summary.metadata["random_weights"] is True


def test_moe_active_parameters_count_k_of_e_experts(demo_dir):
    path = demo_dir / "demo-moe"
    config = validate_model_dir(path)
    summary = summarize(path, config)
    assert summary.params_active < summary.params_total
    dense = demo_dir / "demo-dense"
    dense_summary = summarize(dense, validate_model_dir(dense))
    assert dense_summary.params_active == dense_summary.params_total
