"""Float32 linears on CPU in plain mode: oneDNN's products for several rows, torch's own for one, the same
numbers within float32 rounding, and exact mode left alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from inference.engine.cpu_linear import OneDnnLinear, use_onednn_linears
from inference.engine.runner import Runner, load_model


def _ops(module: nn.Module, x: torch.Tensor) -> set[str]:
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        module(x)
    return {event.key for event in prof.key_averages()}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (3, 5, 96), (1, 37, 96)])
def test_the_products_equal_torchs_linear(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    reference = nn.Linear(96, 80, bias=bias)
    layer = nn.Linear(96, 80, bias=bias)
    layer.load_state_dict(reference.state_dict())
    assert use_onednn_linears(nn.Sequential(layer)) == 1 and type(layer) is OneDnnLinear
    x = torch.randn(*shape)
    with torch.inference_mode():
        got, expected = layer(x), reference(x)
    assert got.shape == expected.shape == (*shape[:-1], 80)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_several_rows_go_to_onednn_and_one_row_to_torchs_own_product() -> None:
    layer = nn.Linear(64, 48)
    use_onednn_linears(nn.Sequential(layer))
    assert "mkldnn::_linear_pointwise" in _ops(layer, torch.randn(1, 8, 64))
    assert "mkldnn::_linear_pointwise" not in _ops(layer, torch.randn(1, 1, 64))
    with torch.enable_grad():  # a product that autograd must see goes to torch's own linear
        assert layer(torch.randn(4, 64, requires_grad=True)).requires_grad


def test_only_float32_cpu_linears_change_and_tied_weights_stay_shared() -> None:
    embed = nn.Embedding(50, 32)
    head = nn.Linear(32, 50, bias=False)
    head.weight = embed.weight  # a head tied to the embeddings, as in Qwen2.5
    bf16 = nn.Linear(32, 32).to(torch.bfloat16)
    model = nn.ModuleDict({"embed": embed, "head": head, "bf16": bf16})
    assert use_onednn_linears(model) == 1
    assert type(head) is OneDnnLinear and type(bf16) is nn.Linear
    assert head.weight is embed.weight


def test_plain_mode_uses_onednn_and_exact_mode_keeps_its_own_products(demo_dir: Path) -> None:
    plain = Runner.prepare(load_model(demo_dir / "demo-dense", "cpu"), exact=False)
    exact = Runner.prepare(load_model(demo_dir / "demo-dense", "cpu"), exact=True)
    assert any(type(m) is OneDnnLinear for m in plain.model.modules())
    assert not any(isinstance(m, OneDnnLinear) for m in exact.model.modules())
