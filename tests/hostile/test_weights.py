"""Weights and configs that lie, imported through the CLI into a live box: each refused at import, by name.

Every case is a copy of the demo dense model with one lie in it. The worker must refuse it at import (the
variant failed, never ready, nothing left in the store), naming the file and the tensor or the figure, and
stay alive; the web process keeps answering and the ledger verifies afterwards.
"""
import json
import random
import struct

import httpx
import pytest

from tests.weightlies import copy_model, edit_header, edit_json, last_tensor, read_safetensors, write_safetensors

# A lying file is refused by the importer's checks, before any row but the failed variant's: what the database or
# broker cannot change, so CI runs it once.
pytestmark = pytest.mark.backend_neutral
WEIGHTS = "model.safetensors"


def truncated(model):
    header, data = read_safetensors(model / WEIGHTS)
    write_safetensors(model / WEIGHTS, header, data[:-100])
    return [WEIGHTS, last_tensor(header), "truncated"]


def header_longer_than_file(model):
    header, data = read_safetensors(model / WEIGHTS)
    raw = json.dumps(header).encode()
    write_safetensors(model / WEIGHTS, raw, data, declared_length=len(raw) + len(data) + 8)
    return [WEIGHTS, "header but only", "bytes follow the length"]


def overlapping(model):
    def edit(header):
        header["model.layers.1.mlp.up_proj.weight"]["data_offsets"] = \
            header["model.layers.1.mlp.gate_proj.weight"]["data_offsets"]
    edit_header(model / WEIGHTS, edit)
    return [WEIGHTS, "model.layers.1.mlp", "overlaps"]


def shape_lies(model):
    edit_header(model / WEIGHTS, lambda h: h["model.layers.2.mlp.down_proj.weight"].update(shape=[128, 512]))
    return [WEIGHTS, "model.layers.2.mlp.down_proj.weight", "shape [128, 512] of F32 needs 262,144 bytes"]


def unknown_dtype(model):
    edit_header(model / WEIGHTS, lambda h: h["model.norm.weight"].update(dtype="Q4_K"))
    return [WEIGHTS, "model.norm.weight", "unknown dtype 'Q4_K'"]


def absurd_layers(model):
    edit_json(model / "config.json", num_hidden_layers=10_000_000)
    return ["config.json", "num_hidden_layers=10,000,000", "model.layers.4.* is missing"]


def config_disagrees(model):
    edit_json(model / "config.json", intermediate_size=1024)
    return ["config.json", "intermediate_size=1,024", "headers hold 972,928"]


def auto_map_in_tokenizer_config(model):
    edit_json(model / "tokenizer_config.json", auto_map={"AutoTokenizer": ["tokenization_evil.Evil", None]})
    return ["tokenizer_config.json", "auto_map", "remote code"]


LIES = [truncated, header_longer_than_file, overlapping, shape_lies, unknown_dtype, absurd_layers,
        config_disagrees, auto_map_in_tokenizer_config]


@pytest.fixture(scope="module")
def key(box):
    return box.new_key("hostile-weights")


def import_refused(box, model, name: str) -> str:
    """Import model through the CLI and return the refusal it prints; fail if the variant became ready."""
    result = box.manage("import_model", str(model), "--name", name, "--kind", "dense", "--wait", check=False)
    assert result.returncode != 0, result.stdout
    assert f"import of {name} failed" in result.stderr, result.stderr
    return result.stderr


def assert_box_sound(box, key: str, refused: list[str]) -> None:
    """Check the store holds nothing of the refused variants, both processes live, the API answers, the ledger."""
    store = box.home / "models"
    for name in refused:
        assert not (store / name).exists()
        assert not (store / ".incoming" / name).exists()
    assert box.procs["web"].poll() is None and box.procs["worker"].poll() is None
    listed = httpx.get(f"{box.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert listed.status_code == 200
    assert not {m["id"] for m in listed.json()["data"]} & set(refused)
    box.manage("audit_verify")


@pytest.mark.parametrize("lie", LIES, ids=[lie.__name__ for lie in LIES])
def test_a_lying_model_is_refused_at_import_naming_what_lies(box, key, tmp_path, lie):
    model = copy_model(box.demo_dir / "demo-dense", tmp_path / "model")
    expected = lie(model)
    name = f"lie-{lie.__name__.replace('_', '-')}"
    message = import_refused(box, model, name)
    for part in expected:
        assert part in message, message
    assert_box_sound(box, key, [name])


def fuzzed_headers(rng: random.Random):
    """Yield raw safetensors files: random bytes, random lengths, random JSON tables."""
    for _ in range(3):
        yield struct.pack("<Q", rng.randrange(2**rng.randrange(1, 64))) + rng.randbytes(rng.randrange(1, 256))
    for _ in range(3):
        table = {f"model.t{i}": {"dtype": rng.choice(["F32", "BF16", "I8", "F8", 7, None]),
                                 "shape": [rng.choice([0, 1, 3, 128, -4, 2**64, "2"]) for _ in range(rng.randrange(3))],
                                 "data_offsets": [rng.randrange(-1, 1024) for _ in range(rng.choice([2, 2, 3]))]}
                 for i in range(rng.randrange(1, 6))}
        raw = json.dumps(table).encode()
        yield struct.pack("<Q", len(raw)) + raw + rng.randbytes(rng.randrange(1024))


def test_fuzzed_safetensors_headers_are_refused_cleanly_and_the_worker_survives(box, key, tmp_path):
    rng = random.Random(1111)
    names = []
    for i, raw in enumerate(fuzzed_headers(rng)):
        model = copy_model(box.demo_dir / "demo-dense", tmp_path / f"fuzz{i}")
        (model / WEIGHTS).write_bytes(raw)
        name = f"fuzz-{i}"
        message = import_refused(box, model, name)
        assert WEIGHTS in message, message
        assert "Traceback" not in message
        names.append(name)
    assert_box_sound(box, key, names)
    # The worker still imports a sound model after all of that.
    box.manage("import_model", str(box.demo_dir / "demo-dense"), "--name", "after-fuzz", "--kind", "dense", "--wait")


def shell(box, code: str):
    """Run code in the box's Django shell; return the JSON it prints on its last line."""
    out = box.manage("shell", "--no-imports", "-c", code).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_a_lying_variant_already_in_the_store_is_neither_analysed_nor_loaded(box, key):
    name = "stored-liar"
    box.manage("import_model", str(box.demo_dir / "demo-dense"), "--name", name, "--kind", "dense", "--wait")
    # As a variant imported before the weight checks: its stored config lies, and its manifest agrees with it.
    shell(box, f"""
import json
from pathlib import Path
from appliance.actions import do_analyse_fit
from appliance.modelfiles import hash_dir
from appliance.models import ModelVariant
v = ModelVariant.objects.get(name={name!r})
config = Path(v.store_path) / "config.json"
config.write_text(json.dumps({{**json.loads(config.read_text()), "num_hidden_layers": 10_000_000}}))
v.manifest = hash_dir(Path(v.store_path))
v.save()
do_analyse_fit(v, actor="test")
print(json.dumps(True))
""")
    result = box.manage("deploy", name, "--wait", "--timeout", "120", check=False)
    assert result.returncode != 0
    assert f"{name} failed to load: refused:" in result.stderr and "num_hidden_layers=10,000,000" in result.stderr
    refused_fit = f"""
import json, time
from audit.models import AuditEvent
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    event = AuditEvent.objects.filter(action="variant.fit", target={name!r}, outcome="refused").first()
    if event:
        break
    time.sleep(0.3)
print(json.dumps(event and event.details["reason"]))
"""
    assert "num_hidden_layers=10,000,000" in shell(box, refused_fit)
    assert box.procs["web"].poll() is None and box.procs["worker"].poll() is None
    listed = httpx.get(f"{box.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert listed.status_code == 200 and name not in {m["id"] for m in listed.json()["data"]}
    box.manage("audit_verify")
