"""The import-time weight checks: safetensors headers against their files, configs against the weights."""
import json
import random
import struct

import pytest

from appliance.weightcheck import DTYPE_BYTES, InvalidWeights, check_model_dir, check_safetensors
from tests.weightlies import copy_model, edit_header, edit_json, last_tensor, read_safetensors, write_safetensors


@pytest.fixture
def dense(tmp_path, demo_dir):
    return copy_model(demo_dir / "demo-dense", tmp_path / "dense")


@pytest.fixture
def weights(dense):
    return dense / "model.safetensors"


def refused(model_dir) -> str:
    with pytest.raises(InvalidWeights) as info:
        check_model_dir(model_dir)
    return str(info.value)


@pytest.mark.parametrize("name", ["demo-dense", "demo-distilled", "demo-moe"])
def test_it_accepts_every_demo_model(demo_dir, name):
    tensors = check_model_dir(demo_dir / name)
    assert "model.embed_tokens.weight" in tensors


def test_its_dtype_table_is_what_safetensors_loads():
    from safetensors.torch import _TYPES

    assert set(DTYPE_BYTES) == set(_TYPES)
    assert all(DTYPE_BYTES[name] == dtype.itemsize for name, dtype in _TYPES.items())


def test_it_refuses_a_truncated_file_naming_the_tensor(dense, weights):
    header, data = read_safetensors(weights)
    write_safetensors(weights, header, data[:-100])  # inside the last tensor
    message = refused(dense)
    assert "model.safetensors" in message and last_tensor(header) in message and "truncated" in message


def test_it_refuses_a_header_longer_than_the_file(dense, weights):
    header, data = read_safetensors(weights)
    raw = json.dumps(header).encode()
    write_safetensors(weights, raw, data, declared_length=len(raw) + len(data) + 1)
    assert "bytes follow the length" in refused(dense)


def test_it_refuses_a_header_over_the_format_limit(dense, weights):
    write_safetensors(weights, b"{}", b"", declared_length=2**40)
    assert "over the format's" in refused(dense)


def test_it_refuses_a_file_too_short_for_a_length(dense, weights):
    weights.write_bytes(b"\x01\x02")
    assert "too short" in refused(dense)


def test_it_refuses_overlapping_tensors(dense, weights):
    def overlap(header):
        # Two tensors of the same size share bytes (the first one's own bytes then belong to none).
        header["model.layers.0.self_attn.k_proj.weight"]["data_offsets"] = \
            header["model.layers.0.self_attn.v_proj.weight"]["data_offsets"]

    edit_header(weights, overlap)
    message = refused(dense)
    assert "overlaps" in message and "self_attn" in message


def test_it_refuses_a_shape_that_lies_about_the_size(dense, weights):
    edit_header(weights, lambda h: h["model.norm.weight"].update(shape=[256]))
    message = refused(dense)
    assert "model.norm.weight" in message and "needs 1,024 bytes" in message and "hold 512" in message


def test_it_refuses_an_unknown_dtype(dense, weights):
    edit_header(weights, lambda h: h["model.norm.weight"].update(dtype="F128"))
    message = refused(dense)
    assert "model.norm.weight" in message and "unknown dtype 'F128'" in message


def test_it_refuses_bytes_no_tensor_covers(dense, weights):
    header, data = read_safetensors(weights)
    write_safetensors(weights, header, data + b"\0" * 64)
    assert "holds 3,891,776 bytes after the header" in refused(dense)


def test_it_refuses_a_tensor_named_twice(dense, weights):
    header, data = read_safetensors(weights)
    raw = json.dumps(header).encode()
    entry = json.dumps(header["model.norm.weight"]).encode()
    raw = raw[:-1] + b', "model.norm.weight": ' + entry + b"}"
    write_safetensors(weights, raw, data)
    assert "names 'model.norm.weight' twice" in refused(dense)


def test_it_refuses_the_same_tensor_in_two_shards(dense, weights):
    header, data = read_safetensors(weights)
    begin, end = header["model.norm.weight"]["data_offsets"]
    write_safetensors(dense / "extra.safetensors",
                      {"model.norm.weight": {**header["model.norm.weight"], "data_offsets": [0, end - begin]}},
                      data[begin:end])
    assert "model.norm.weight is in both extra.safetensors and model.safetensors" in refused(dense)


def test_it_refuses_an_index_that_points_at_a_missing_tensor(dense):
    (dense / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.layers.9.mlp.up_proj.weight": "model.safetensors"}}))
    assert "places tensor model.layers.9.mlp.up_proj.weight" in refused(dense)


@pytest.mark.parametrize("header", [b"[1, 2]", b"{\"a\": 1", b"\xff\xfe", b"{" * 100_000, b"{\"x\": 1e999999}",
                                    b"{\"x\": " + b"9" * 5000 + b"}"])
def test_it_refuses_headers_that_are_not_a_tensor_table(tmp_path, header):
    path = tmp_path / "bad.safetensors"
    write_safetensors(path, header, b"")
    with pytest.raises(InvalidWeights, match="bad.safetensors"):
        check_safetensors(path, "bad.safetensors")


def test_random_headers_are_always_a_clean_refusal(tmp_path):
    rng = random.Random(11)
    path = tmp_path / "fuzz.safetensors"
    for _ in range(300):
        kind = rng.randrange(3)
        if kind == 0:
            body = rng.randbytes(rng.randrange(64))
            path.write_bytes(struct.pack("<Q", rng.randrange(2**rng.randrange(1, 64))) + body)
        else:
            header = {f"t{i}": {"dtype": rng.choice([*DTYPE_BYTES, "X", 3, None, ["F32"], {}]),
                                "shape": [rng.choice([0, 1, 7, -1, 2**70, 10**4000, "8", 1.5, [2]])
                                          for _ in range(rng.randrange(5))],
                                "data_offsets": [rng.randrange(-2, 64) for _ in range(rng.choice([1, 2, 2, 3]))]}
                      for i in range(rng.randrange(1, 5))}
            write_safetensors(path, header, rng.randbytes(rng.randrange(64)))
        try:
            check_safetensors(path, "fuzz.safetensors")
        except InvalidWeights as exc:
            assert "fuzz.safetensors" in str(exc)


def test_it_refuses_an_absurd_layer_count_naming_the_figure(dense):
    edit_json(dense / "config.json", num_hidden_layers=10_000_000)
    message = refused(dense)
    assert "num_hidden_layers=10,000,000" in message and "model.layers.4.* is missing" in message


def test_it_refuses_a_model_no_known_box_could_hold(dense):
    edit_json(dense / "config.json", hidden_size=10**12)
    message = refused(dense)
    assert "largest box the advisor knows (8xH200+cpu:8T" in message and "hidden_size=1,000,000,000,000" in message


def test_it_refuses_an_embedding_that_disagrees_with_the_config(dense):
    edit_json(dense / "config.json", vocab_size=1500)
    message = refused(dense)
    assert "vocab_size=1,500" in message and "model.embed_tokens.weight" in message and "[1492, 128]" in message


def test_it_refuses_a_parameter_count_that_disagrees_with_the_weights(dense):
    edit_json(dense / "config.json", intermediate_size=512)
    message = refused(dense)
    assert "intermediate_size=512" in message and "headers hold 972,928" in message


def test_it_refuses_weights_with_more_layers_than_the_config(dense):
    edit_json(dense / "config.json", num_hidden_layers=3)
    assert "the weights hold model.layers.3.* but config.json says num_hidden_layers=3" in refused(dense)


def test_it_refuses_a_figure_that_is_not_a_whole_number(dense):
    edit_json(dense / "config.json", num_hidden_layers="4")
    assert "num_hidden_layers must be a whole number" in refused(dense)


@pytest.mark.parametrize("file", ["tokenizer_config.json", "generation_config.json", "processor_config.json",
                                  "preprocessor_config.json", "sub/video_preprocessor_config.json"])
def test_it_refuses_auto_map_in_any_config_file(dense, file):
    path = dense / file
    path.parent.mkdir(exist_ok=True)
    if not path.exists():
        path.write_text("{}")
    edit_json(path, auto_map={"AutoTokenizer": ["tok.Tok", None]})
    message = refused(dense)
    assert file in message and "auto_map" in message


def test_it_refuses_auto_map_nested_in_a_sub_config(dense):
    edit_json(dense / "config.json", text_config={"auto_map": {"AutoConfig": "c.C"}})
    assert "config.json asks for remote code (auto_map)" in refused(dense)


def test_it_refuses_custom_pipelines_and_hub_kernels(dense, tmp_path):
    edit_json(dense / "config.json", custom_pipelines={"x": {"impl": "p.P"}})
    assert "custom_pipelines" in refused(dense)
    edit_json(dense / "config.json", custom_pipelines={}, attn_implementation="kernels-community/flash-mla")
    dense_config = json.loads((dense / "config.json").read_text())
    dense_config.pop("custom_pipelines")
    (dense / "config.json").write_text(json.dumps(dense_config))
    assert "kernels-community/flash-mla" in refused(dense)


def test_it_refuses_a_custom_generate_directory(dense):
    (dense / "custom_generate").mkdir()
    (dense / "custom_generate" / "generate.py").write_text("print('hi')\n")
    assert "custom_generate/" in refused(dense)


def test_it_refuses_a_json_file_that_does_not_parse(dense):
    (dense / "tokenizer_config.json").write_text("{oops")
    assert "tokenizer_config.json is not valid JSON" in refused(dense)


def test_it_leaves_a_vocabulary_entry_named_auto_map_alone(dense):
    tokenizer = json.loads((dense / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["auto_map"] = len(tokenizer["model"]["vocab"])
    (dense / "tokenizer.json").write_text(json.dumps(tokenizer))
    check_model_dir(dense)


@pytest.mark.django_db
def test_an_import_of_lying_weights_is_refused_and_never_ready(dense, weights, django_capture_on_commit_callbacks):
    from appliance import importer
    from appliance.actions import do_start_import
    from audit.models import AuditEvent

    edit_header(weights, lambda h: h["model.norm.weight"].update(shape=[256]))
    with django_capture_on_commit_callbacks(execute=False):
        variant = do_start_import(name="liar", kind="dense", source_path=str(dense), actor="test")
    importer.run_import(variant.pk)
    variant.refresh_from_db()
    assert variant.status == "failed"
    assert "model.safetensors: tensor model.norm.weight" in variant.status_detail
    event = AuditEvent.objects.filter(action="variant.import", target="liar").latest("seq")
    assert event.outcome == "refused"


def test_the_checks_import_no_torch(demo_dir):
    # The worker runs them on multi-GB checkpoints: headers only, no torch or transformers loaded.
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from appliance.weightcheck import check_model_dir; "
            f"check_model_dir(Path({str(demo_dir / 'demo-moe')!r})); "
            "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
