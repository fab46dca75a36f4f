import json
import os
import shutil
import socket
import stat

import pytest

from appliance.modelfiles import (
    DIR_MODE,
    FILE_MODE,
    InvalidModelDir,
    OutsideStore,
    copy_and_hash,
    hash_dir,
    in_store,
    manifest_mismatches,
    remove_in_store,
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


# --- Links, special files and the store's permissions ---

def test_it_refuses_a_link_to_a_file_naming_it(dense, tmp_path):
    secret = tmp_path / "secret_key"
    secret.write_text("do not copy me")
    (dense / "tokenizer_extra.json").symlink_to(secret)
    with pytest.raises(InvalidModelDir, match=r"tokenizer_extra\.json \(symbolic link\).*never followed"):
        validate_model_dir(dense)


def test_it_refuses_a_link_to_a_directory_and_a_link_that_stays_inside(dense):
    (dense / "shards").symlink_to(dense, target_is_directory=True)
    (dense / "alias.safetensors").symlink_to(dense / "model.safetensors")
    with pytest.raises(InvalidModelDir) as refused:
        validate_model_dir(dense)
    assert "alias.safetensors (symbolic link)" in str(refused.value)
    assert "shards (symbolic link)" in str(refused.value)


def test_it_refuses_a_fifo_without_blocking_on_it(dense):
    os.mkfifo(dense / "weights.pipe")
    with pytest.raises(InvalidModelDir, match=r"weights\.pipe \(FIFO\)"):
        validate_model_dir(dense)
    with pytest.raises(InvalidModelDir, match=r"weights\.pipe \(FIFO\)"):
        copy_and_hash(dense, dense.parent / "copy")


def test_it_refuses_a_socket(dense):
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(dense / "control.sock"))
        with pytest.raises(InvalidModelDir, match=r"control\.sock \(socket\)"):
            validate_model_dir(dense)


def test_the_source_itself_may_be_a_link_to_a_directory(dense, tmp_path):
    alias = tmp_path / "usb-disk"
    alias.symlink_to(dense, target_is_directory=True)
    assert validate_model_dir(alias)["model_type"] == "llama"
    assert copy_and_hash(alias, tmp_path / "copy") == hash_dir(dense)


def test_copies_get_the_store_permissions_not_the_sources(dense, tmp_path):
    (dense / "sub").mkdir(mode=0o777)
    (dense / "sub" / "notes.txt").write_text("x")
    for path in [dense / "config.json", dense / "sub" / "notes.txt", dense / "sub"]:
        path.chmod(0o777)
    old = os.umask(0)
    try:
        copy_and_hash(dense, tmp_path / "copy")
    finally:
        os.umask(old)
    copy = tmp_path / "copy"
    assert stat.S_IMODE(copy.stat().st_mode) == DIR_MODE == 0o750
    assert stat.S_IMODE((copy / "sub").stat().st_mode) == DIR_MODE
    assert {stat.S_IMODE(p.stat().st_mode) for p in copy.rglob("*") if p.is_file()} == {FILE_MODE} == {0o640}


@pytest.mark.parametrize("parts", [("..",), ("../x",), ("",), ("/etc",), (".",), ("a", "..", "..", "b")])
def test_store_paths_must_stay_strictly_inside_the_store(tmp_path, parts):
    store = tmp_path / "models"
    store.mkdir()
    with pytest.raises(OutsideStore, match="not inside the model store"):
        in_store(store, *parts)


def test_a_link_planted_in_the_store_does_not_lead_out_of_it(tmp_path):
    store, outside = tmp_path / "models", tmp_path / "outside"
    store.mkdir()
    outside.mkdir()
    (outside / "keep").write_text("x")
    (store / "demo").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OutsideStore):
        remove_in_store(store, "demo")
    assert (outside / "keep").exists()


def test_remove_in_store_removes_a_tree_inside_it(tmp_path):
    store = tmp_path / "models"
    (store / "demo" / "sub").mkdir(parents=True)
    (store / "demo" / "sub" / "f").write_text("x")
    remove_in_store(store, "demo")
    remove_in_store(store, "demo")  # already gone: nothing to do
    assert list(store.iterdir()) == []
