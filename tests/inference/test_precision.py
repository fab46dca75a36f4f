"""Weight precision: the setting's rules, int8 weight-only layers against the products they replace, and the
engine on CPU in bfloat16 and int8 against `generate` on the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from inference.engine import Engine, EngineConfig, SamplingParams
from inference.engine.precision import (
    BF16_PAYS_FROM_BYTES,
    INT8_ROWS_PER_CALL,
    Int8WeightOnlyLinear,
    PackedBf16Linear,
    cpu_has_native_bf16,
    pack_bf16_weights,
    quantize_int8_weight_only,
    resolve_precision,
)
from inference.engine import precision as precision_module
from inference.engine.runner import Runner, load_model
from tests.inference.conftest import run

ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "user", "content": "How many experts are active for each token?"}]
GREEDY = SamplingParams(max_tokens=24, temperature=0)


def test_auto_is_float32_in_exact_mode_and_bfloat16_on_gpus():
    assert resolve_precision("auto", "cpu", exact=True) == "float32"
    assert resolve_precision("auto", "cuda", exact=False) == "bfloat16"
    assert resolve_precision("auto", "cpu", exact=False) == ("bfloat16" if cpu_has_native_bf16() else "float32")
    # A model of a few MB is bound by per-op overhead, where bf16's conversions cost more than they save.
    assert resolve_precision("auto", "cpu", exact=False, weight_file_bytes=BF16_PAYS_FROM_BYTES - 1) == "float32"
    assert resolve_precision("auto", "cuda", exact=False, weight_file_bytes=1) == "bfloat16"
    assert resolve_precision("int8", "cpu", exact=False) == "int8"


@pytest.mark.parametrize(("precision", "device", "exact", "message"), [
    ("fp8", "cpu", False, "precision must be one of auto, float32, bfloat16, int8; got 'fp8'"),
    ("int8", "cuda", False, "int8 uses torch's CPU kernels"),
    ("int8", "cpu", True, "cannot run in exact mode"),
])
def test_unrunnable_precisions_are_refused_by_name(precision, device, exact, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_precision(precision, device, exact=exact)


def test_engine_config_refuses_an_unknown_precision_and_int8_with_exact():
    with pytest.raises(ValueError, match="precision must be one of"):
        EngineConfig(precision="float16")
    with pytest.raises(ValueError, match="int8 cannot run in exact mode"):
        EngineConfig(precision="int8", exact=True)


def test_settings_refuse_an_unknown_precision_variable():
    env = {**os.environ, "APPLIANCE_ENGINE_PRECISION": "int4", "DJANGO_SETTINGS_MODULE": "appliance.settings"}
    result = subprocess.run([sys.executable, "-c", "import appliance.settings"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "APPLIANCE_ENGINE_PRECISION must be auto, float32, bfloat16 or int8, not 'int4'" in result.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 15, INT8_ROWS_PER_CALL + 3])  # one call, and one split over two calls
def test_int8_linear_computes_the_product_of_its_dequantized_weights(dtype, rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=True).to(dtype)
    q = Int8WeightOnlyLinear(linear)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (80,) and q.scales.dtype == torch.bfloat16
    dequantized = q.weight.float() * q.scales.float()[:, None]
    # Symmetric per-row rounding: no weight moves by more than half a step, or a whole step where the bf16
    # scale, rounded down, clips the row's largest weight to 127.
    step = q.scales.float().max()
    assert (dequantized - linear.weight.float()).abs().max() <= step + 1e-6
    x = torch.randn(rows, 96).to(dtype)
    got = q(x)
    assert got.dtype == dtype and got.shape == (rows, 80)
    # The kernel computes in bfloat16 whatever the model's dtype: the input is rounded to it, and so is the
    # product before the bias is added in the model's dtype.
    expected = (x.bfloat16().float() @ dequantized.t()).bfloat16().to(dtype) + linear.bias
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def _experts_call(model: nn.Module):
    """Return the routed experts of the MoE demo's layer 1 and a fixed routing of 7 tokens to 4 of them each."""
    experts = model.model.layers[1].mlp.experts
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, model.config.hidden_size, generator=generator).to(model.dtype)
    top_k_index = torch.stack([torch.randperm(experts.num_experts, generator=generator)[:4] for _ in range(7)])
    return experts, (hidden, top_k_index, torch.rand(7, 4, generator=generator).to(model.dtype))


def test_int8_experts_route_like_the_original_experts(demo_dir: Path):
    model = load_model(demo_dir / "demo-moe", "cpu", "float32")
    experts, call = _experts_call(model)
    with torch.no_grad():
        expected = experts(*call)
        counts = quantize_int8_weight_only(model)
        got = experts(*call)
    assert counts["int8_expert_collections"] == 2  # layers 1 and 2; layer 0 is dense
    assert not hasattr(experts, "gate_up_proj")  # the float weights are gone, not kept beside the int8 ones
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_bf16_weights_are_packed_for_onednn_only_where_the_cpu_computes_bf16(demo_dir: Path):
    """What pack_bf16_weights does on the CPU the suite runs on: with native bf16 every linear and expert
    collection is packed and computes what the plain bf16 weights computed; without it nothing changes."""
    model = load_model(demo_dir / "demo-moe", "cpu", "bfloat16")
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3]])
    experts, call = _experts_call(model)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    with torch.inference_mode():
        expected_logits, expected_experts = model(ids).logits, experts(*call)
        counts = pack_bf16_weights(model)
        got_logits, got_experts = model(ids).logits, experts(*call)
    if cpu_has_native_bf16():
        assert counts == {"packed_linear_layers": linears, "packed_expert_collections": 2}
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
        assert not hasattr(experts, "gate_up_proj")  # the plain weights are gone, not kept beside the packed ones
        assert isinstance(model.get_output_embeddings(), PackedBf16Linear)
        # Same bf16 products, summed in oneDNN's blocked order: equal up to bf16 rounding.
        torch.testing.assert_close(got_experts, expected_experts, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got_logits, expected_logits, atol=5e-2, rtol=5e-2)
    else:
        assert counts == {"packed_linear_layers": 0, "packed_expert_collections": 0}
        assert torch.equal(got_logits, expected_logits) and torch.equal(got_experts, expected_experts)


def test_nothing_is_packed_without_native_bf16_or_in_exact_mode(demo_dir: Path, monkeypatch):
    model = load_model(demo_dir / "demo-dense", "cpu", "bfloat16")
    Runner.prepare(model, exact=True)  # exact mode splits each nn.Linear per request itself
    assert not any(isinstance(m, PackedBf16Linear) for m in model.modules())
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    assert pack_bf16_weights(load_model(demo_dir / "demo-moe", "cpu", "bfloat16")) == {
        "packed_linear_layers": 0, "packed_expert_collections": 0}
    # float32 and int8 weights are never packed, whatever the CPU.
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    model = load_model(demo_dir / "demo-moe", "cpu", "float32")
    assert pack_bf16_weights(model) == {"packed_linear_layers": 0, "packed_expert_collections": 0}


@pytest.mark.parametrize(("name", "precision"), [("demo-dense", "bfloat16"), ("demo-moe", "bfloat16"),
                                                 ("demo-moe", "int8"), ("demo-distilled", "int8")])
def test_engine_answers_as_generate_does_on_the_same_weights(demo_dir: Path, name: str, precision: str):
    reference = load_model(demo_dir / name, "cpu", precision)
    with Engine(demo_dir / name, device="cpu", precision=precision) as engine:
        prompt = engine.encode_chat(CHAT)
        handle_text = run(_tokens(engine, prompt))
        figures = engine.describe()
    with torch.inference_mode():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False)
    assert handle_text == out[0, len(prompt):].tolist()
    assert figures["precision"] == precision


def test_a_demo_runs_in_float32_by_default(demo_dir: Path):
    with Engine(demo_dir / "demo-dense", device="cpu", telemetry=False) as engine:
        assert engine.describe()["precision"] == "float32"


def test_smaller_formats_hold_fewer_weight_bytes(demo_dir: Path):
    sizes = {}
    for precision in ("float32", "bfloat16", "int8"):
        with Engine(demo_dir / "demo-moe", device="cpu", precision=precision, telemetry=False) as engine:
            sizes[precision] = engine.describe()["weight_bytes"]
    # Halved but for the few small float32 buffers that stay (rotary frequencies, the routers' score bias).
    assert sizes["bfloat16"] < 0.51 * sizes["float32"]
    # int8 keeps embeddings and the head in the compute type: bfloat16 where the CPU has it, else float32.
    assert sizes["int8"] < sizes["bfloat16"] and sizes["int8"] < 0.5 * sizes["float32"]


async def _tokens(engine: Engine, prompt: list[int]) -> list[int]:
    handle = engine.submit(prompt, GREEDY)
    [chunk async for chunk in handle]
    return list(handle.state.output_ids)


def test_a_packed_model_is_measured_as_it_was_loaded(demo_dir: Path):
    # The console's measured allocation: parameters counted as loaded, and weights laid out for oneDNN (which have
    # no storage to share) counted by their own bytes.
    from inference.engine.server import measured_allocation
    from inference.fit.measure import count_parameters

    reference = load_model(demo_dir / "demo-dense", "cpu", "bfloat16")
    with Engine(demo_dir / "demo-dense", device="cpu", precision="bfloat16") as engine:
        packed = sum(isinstance(m, PackedBf16Linear) for m in engine.model.modules())
        measured = measured_allocation(engine)
    assert packed == (sum(isinstance(m, nn.Linear) for m in reference.modules()) if cpu_has_native_bf16() else 0)
    assert "error" not in measured and measured["dtype"] == "bfloat16"
    assert measured["parameters"] == count_parameters(reference)
    assert measured["weights"]["storage_bytes"] >= sum(p.numel() * p.element_size() for p in reference.parameters())
