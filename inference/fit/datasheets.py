"""The accelerator datasheet table and the largest box the advisor knows, with no torch import.

The worker's import checks bound a model against these figures without loading torch; hardware.py
builds planning specs and this box's inventory on top of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    """One accelerator model's datasheet figures."""

    name: str
    memory_gb: float
    bandwidth_tbs: float  # peak memory bandwidth, TB/s
    bf16_tflops: float  # dense (no 2:4 sparsity) BF16 tensor throughput, TFLOP/s
    source: str


# Vendor datasheets; dense BF16 is half the "with sparsity" figure NVIDIA prints first. SXM parts unless named.
ACCELERATORS = {a.name: a for a in (
    Accelerator("H20", 96, 4.0, 148, "NVIDIA HGX H20 product brief (2023): 96 GB HBM3, 4.0 TB/s, BF16 148 TFLOPS"),
    Accelerator("H800", 80, 3.35, 989, "NVIDIA H800 SXM5 datasheet: 80 GB HBM3, 3.35 TB/s, BF16 1,979 TFLOPS with sparsity"),
    Accelerator("H100", 80, 3.35, 989, "NVIDIA H100 Tensor Core GPU datasheet (SXM): 80 GB, 3.35 TB/s, BF16 1,979 TFLOPS with sparsity"),
    Accelerator("H200", 141, 4.8, 989, "NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, BF16 1,979 TFLOPS with sparsity"),
    Accelerator("A100-80G", 80, 2.039, 312, "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): 2,039 GB/s, BF16 312 TFLOPS dense"),
    Accelerator("A100-40G", 40, 1.555, 312, "NVIDIA A100 Tensor Core GPU datasheet (40GB SXM): 1,555 GB/s, BF16 312 TFLOPS dense"),
    Accelerator("L40S", 48, 0.864, 362, "NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s, BF16 362.05 TFLOPS (733 with sparsity)"),
    Accelerator("RTX4090", 24, 1.008, 165, "NVIDIA Ada Lovelace architecture whitepaper, appendix: RTX 4090 24 GB GDDR6X, "
                                         "1,008 GB/s, peak BF16 tensor 165.2 TFLOPS (FP32 accumulate, dense)"),
)}
_ALIASES = {"RTX-4090": "RTX4090", "4090": "RTX4090", "A100": "A100-80G", "A100-80GB": "A100-80G", "A100-40GB": "A100-40G"}

# A CPU-only planning box: two sockets of 4th-gen Xeon (Sapphire Rapids), 8 DDR5-4800 channels each.
# Bandwidth: 4800 MT/s x 8 bytes = 38.4 GB/s per channel (JEDEC DDR5) x 16 = 0.614 TB/s peak.
# BF16: AMX does 1,024 BF16 FLOP per cycle per core (Intel Architecture Optimization Manual, AMX chapter);
# 2 x 56 cores (Xeon Platinum 8480+) x 1.9 GHz all-core AMX frequency ~ 218 TFLOP/s peak.
CPU_HOST = {"bandwidth_tbs": 0.614, "bf16_tflops": 218.0,
            "source": "2x Xeon Platinum 8480+: 16 ch DDR5-4800 (JEDEC) = 0.614 TB/s; AMX 1024 BF16 FLOP/cycle/core"}


# The largest single box these figures describe: an HGX/DGX baseboard carries 8 SXM GPUs (NVIDIA HGX H200
# datasheet: "4 or 8 GPUs"), and a 2-socket Xeon Platinum 8480+ host takes at most 4 TB of DDR5 per socket
# (Intel ARK, "Max Memory Size"). A model that cannot be held there, even at 4 bits a weight, fits no box.
GPUS_PER_BOX = 8
HOST_RAM_CEILING_GB = 8000.0
NARROWEST_BITS_PER_PARAM = 4  # int4, the narrowest dtype the advisor plans (memory.DTYPE_BYTES)


def largest_box() -> tuple[str, float]:
    """Return the label and weight capacity in GB of the largest box in the table (GPUs plus host RAM)."""
    biggest = max(ACCELERATORS.values(), key=lambda a: a.memory_gb)
    label = f"{GPUS_PER_BOX}x{biggest.name}+cpu:{HOST_RAM_CEILING_GB / 1000:g}T"
    return label, GPUS_PER_BOX * biggest.memory_gb + HOST_RAM_CEILING_GB
