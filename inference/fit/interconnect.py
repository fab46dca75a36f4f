"""Link figures the throughput model moves activations over: the GPU-to-GPU fabric in a box, the network between boxes.

Figures are per GPU and per direction, in GB/s. NVIDIA prints NVLink as the total of both directions
("900 GB/s"), so one direction is half of it. No torch import: the console computes predictions from these.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Links:
    """How fast one GPU can send to its peers in the box and to other boxes."""

    in_box_gbs: float  # one direction, per GPU
    between_boxes_gbs: float  # one direction, per GPU
    source: str


# NVLink 4 on HGX H100/H200/H20 and the reduced NVLink of the H800; PCIe cards talk over PCIe 4.0 x16
# (32 GB/s per direction). Between boxes: one ConnectX-7 400 Gb/s NDR InfiniBand port per GPU, as in the
# NVIDIA DGX H100/H200 reference design (8 single-port OSFP ConnectX-7), i.e. 50 GB/s per GPU and direction.
_IB_NDR_GBS = 50.0
_IB_SOURCE = "between boxes: 1x ConnectX-7 400 Gb/s NDR per GPU (NVIDIA DGX H100/H200 datasheet) = 50 GB/s"
LINKS = {
    "H100": Links(450.0, _IB_NDR_GBS, "NVIDIA H100 SXM datasheet: NVLink 900 GB/s; " + _IB_SOURCE),
    "H200": Links(450.0, _IB_NDR_GBS, "NVIDIA H200 SXM datasheet: NVLink 900 GB/s; " + _IB_SOURCE),
    "H20": Links(450.0, _IB_NDR_GBS, "NVIDIA HGX H20 product brief: NVLink 900 GB/s; " + _IB_SOURCE),
    "H800": Links(200.0, _IB_NDR_GBS, "NVIDIA H800 SXM5 datasheet: NVLink 400 GB/s; " + _IB_SOURCE),
    "A100-80G": Links(300.0, 25.0, "NVIDIA A100 datasheet (SXM): NVLink 600 GB/s; between boxes 200 Gb/s HDR "
                                   "per GPU (DGX A100 datasheet: 8x ConnectX-6 200 Gb/s)"),
    "A100-40G": Links(300.0, 25.0, "NVIDIA A100 datasheet (SXM): NVLink 600 GB/s; between boxes 200 Gb/s HDR "
                                   "per GPU (DGX A100 datasheet: 8x ConnectX-6 200 Gb/s)"),
    "L40S": Links(32.0, 12.5, "NVIDIA L40S datasheet: PCIe Gen4 x16 (64 GB/s both directions), no NVLink; "
                              "between boxes one 100 Gb/s port per GPU assumed"),
    "RTX4090": Links(32.0, 12.5, "RTX 4090: PCIe Gen4 x16 (64 GB/s both directions), no NVLink; "
                                 "between boxes one 100 Gb/s port per GPU assumed"),
}


def links_for(accelerator_name: str) -> Links:
    """Return the link figures of an accelerator in the datasheet table (PCIe figures for one that is not)."""
    return LINKS.get(accelerator_name, LINKS["RTX4090"])
