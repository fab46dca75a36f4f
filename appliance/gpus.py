"""Whether this box has GPUs, as torch sees them (the GPUs the engines will use), without loading torch where
there can be none.

The web process, the worker and every management command ask (registering the node, choosing an engine, an FP8
checkpoint's refusal, the console's dashboard), and importing torch costs each of them about two seconds of CPU
and a few hundred MB. CUDA and ROCm reach a GPU only through their driver's device files, so where none exists
torch could only answer no, and it is not loaded to say so.
"""

from __future__ import annotations

import glob

# NVIDIA's (/dev/nvidia0, ...), WSL2's GPU paravirtualisation (CUDA on Windows hosts), AMD's ROCm.
DRIVER_DEVICES = ("/dev/nvidia[0-9]*", "/dev/dxg", "/dev/kfd")


def driver_present() -> bool:
    return any(glob.glob(pattern) for pattern in DRIVER_DEVICES)


def torch_cuda():
    """Return `torch.cuda` when torch sees at least one GPU, else None (torch not loaded without a GPU driver)."""
    if not driver_present():
        return None
    try:
        import torch  # here: seconds to import, and only a box with a GPU driver gets this far
    except ImportError:  # optional to the web process and the console: without it there are no GPUs to use
        return None
    return torch.cuda if torch.cuda.is_available() else None
