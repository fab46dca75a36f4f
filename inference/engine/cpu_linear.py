"""Float32 linear layers on CPU through oneDNN's matmul when they multiply more than one row.

torch's CPU `linear` hands float32 products to MKL, whose GEMM is slow for the few rows of a batched decode
step on CPUs it does not tune for: on a 2-core AVX2 EPYC (one thread, a 1024x8192 layer) 8 rows took
10-14 ms, four times one row's 2.5-3 ms, when reading the weights once should cost about one row's time.
oneDNN's matmul, which torch ships and uses for bfloat16, multiplies the same float32 weights (no copy, no
repacking) in 8.4 ms for 8 rows, 11 for 16 and 21 for 64 rows, against MKL's 13.7, 17.3 and 33.9 in the
same run (`bench/step_profile.py` shows what that does to a whole step). One row stays with MKL, whose
GEMV reads the weights at full speed.

Plain mode only: exact mode pins every product's kernel to the one unbatched `generate` uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def onednn_available() -> bool:
    """Return True when torch has oneDNN (mkldnn) for CPU products."""
    return bool(torch.backends.mkldnn.is_available())


class OneDnnLinear(nn.Linear):
    """An nn.Linear whose float32 products of more than one row on CPU run through oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if rows <= 1 or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def use_onednn_linears(model: nn.Module) -> int:
    """Turn the model's float32 CPU nn.Linear layers into OneDnnLinear in place; return how many.

    The class is swapped, not the module, so parameters (a head tied to the embeddings included) stay
    the same tensors.
    """
    if not onednn_available():
        return 0
    count = 0
    for module in model.modules():
        if (type(module) is nn.Linear and module.weight.dtype == torch.float32
                and module.weight.device.type == "cpu"):
            module.__class__ = OneDnnLinear
            count += 1
    return count
