"""Recognise FP8 block-quantized checkpoints (DeepSeek-V3/R1's format) and say whether this box can serve one.

Such a checkpoint declares `quantization_config: {"quant_method": "fp8", "weight_block_size": [128, 128], …}`
in config.json and stores its weights as F8_E4M3 with a float32 `weight_scale_inv` per block. Serving it
needs GPUs with FP8 tensor cores, compute capability 8.9 or newer; elsewhere the deploy is refused before
anything is built, saying so.
"""
from __future__ import annotations

from . import gpus

MIN_CAPABILITY = (8, 9)
CAPABLE_GPUS = "NVIDIA L4/L40S (8.9), H100/H200/H20 (9.0), B200 (10.0)"


def fp8_scheme(config: dict) -> dict | None:
    """Return the FP8 quantization_config of a config, or None when the checkpoint is not FP8-quantized."""
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(quant, dict) and str(quant.get("quant_method", "")).lower() == "fp8":
        return quant
    return None


def describe(scheme: dict) -> str:
    block = scheme.get("weight_block_size")
    blocks = f", {block[0]}×{block[1]} blocks" if isinstance(block, list) and len(block) == 2 else ""
    return f"FP8 ({scheme.get('fmt', 'e4m3')}{blocks}, activations {scheme.get('activation_scheme', 'dynamic')})"


def serving_device(setting: str) -> str:
    """Return where the engine would serve for APPLIANCE_ENGINE_DEVICE: "cuda" when it may and a GPU is seen.

    Asked only for an FP8 checkpoint; torch is loaded only where a GPU driver is (appliance.gpus).
    """
    if setting == "cpu":
        return "cpu"
    return "cuda" if gpus.torch_cuda() else "cpu"


def capabilities() -> list[tuple[str, tuple[int, int]]]:
    """Return (name, compute capability) of each GPU torch sees on this box (empty without CUDA)."""
    cuda = gpus.torch_cuda()
    if cuda is None:
        return []
    return [(cuda.get_device_name(i), cuda.get_device_capability(i)) for i in range(cuda.device_count())]


def deploy_refusal(config: dict, device: str, gpus: list[tuple[str, tuple[int, int]]] | None = None) -> str | None:
    """Return why this box cannot serve an FP8 checkpoint on device ("cpu" or "cuda"), or None when it can."""
    scheme = fp8_scheme(config)
    if scheme is None:
        return None
    what = f"an FP8 block-quantized checkpoint ({describe(scheme)})"
    need = (f"FP8 needs GPUs of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
            f"({CAPABLE_GPUS}); deploy it on such a box, or import a bf16 copy of it here")
    if device != "cuda":
        return f"this is {what} and this box serves on CPU; {need}"
    gpus = capabilities() if gpus is None else gpus
    weak = [f"{name} ({major}.{minor})" for name, (major, minor) in gpus if (major, minor) < MIN_CAPABILITY]
    if not gpus or weak:
        return f"this is {what} and this box's GPUs {', '.join(weak) or '(none seen)'} cannot run it; {need}"
    return None
