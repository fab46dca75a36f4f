"""Accelerator datasheet table, planning specs such as `8xH20+cpu:1024G`, and the inventory of this box."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

import psutil
import torch

from .datasheets import _ALIASES, ACCELERATORS, CPU_HOST, GPUS_PER_BOX, Accelerator

# DeepSeek's own decode unit is 18 boxes (experts.DEEPSEEK_DECODE_UNIT_GPUS); a few times that is still a plan.
MAX_BOXES = 64


@dataclass
class HardwareSpec:
    """A box: its accelerators (possibly none) and its host memory."""

    label: str
    accelerator: Accelerator | None = None
    count: int = 0  # accelerators in the whole deployment, all boxes together
    boxes: int = 1  # boxes the accelerators are spread over ('9x8xH100': nine boxes of eight)
    host_ram_gb: float | None = None  # None: not stated, so offload to CPU RAM cannot be checked
    host_bandwidth_tbs: float | None = None
    host_bf16_tflops: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def device_memory_gb(self) -> float:
        """Return the memory the weights and KV live in: all GPUs together, else host RAM."""
        if self.accelerator:
            return self.count * self.accelerator.memory_gb
        return self.host_ram_gb or 0.0

    @property
    def bandwidth_tbs(self) -> float | None:
        """Return the aggregate bandwidth the weights are read at (tensor parallel reads all GPUs at once)."""
        return self.count * self.accelerator.bandwidth_tbs if self.accelerator else self.host_bandwidth_tbs

    @property
    def bf16_tflops(self) -> float | None:
        """Return the aggregate dense BF16 throughput of the device side."""
        return self.count * self.accelerator.bf16_tflops if self.accelerator else self.host_bf16_tflops

    @property
    def gpus(self) -> int:
        """Return the number of accelerators (0 for a CPU-only box)."""
        return self.count if self.accelerator else 0

    @property
    def gpus_per_box(self) -> int:
        """Return the accelerators in one box (all of them for a single box)."""
        return self.gpus // max(1, self.boxes)

    def to_dict(self) -> dict:
        """Return the spec as JSON-ready values."""
        out = asdict(self)
        out.update(device_memory_gb=self.device_memory_gb, bandwidth_tbs=self.bandwidth_tbs,
                   bf16_tflops=self.bf16_tflops)
        return out


class HardwareSpecError(ValueError):
    """A planning spec that cannot be parsed; the message names the bad part."""


# '8xH20', 'H20' or '9x8xH100' (nine boxes of eight): the leading count is boxes when two are given.
_GPU_RE = re.compile(r"^(?:(\d+)\s*[x×*]\s*)?(?:(\d+)\s*[x×*]\s*)?([A-Za-z0-9][A-Za-z0-9-]*)$")
_CPU_RE = re.compile(r"^cpu:(\d+(?:\.\d+)?)([GT])B?(?:@(\d+(?:\.\d+)?)TB/s)?$", re.IGNORECASE)


def parse_hardware(spec: str) -> HardwareSpec:
    """Parse '8xH20', '9x8xH100', '4xA100-80G+cpu:2048G', 'cpu:512G' or 'cpu:1024G@0.4TB/s' into a HardwareSpec.

    Host RAM (cpu:...) is per box, as is bought; several boxes multiply it.
    """
    if not spec or not spec.strip():
        raise HardwareSpecError("empty hardware spec; try 8xH20, 8xH200+cpu:2048G or cpu:1024G")
    hw = HardwareSpec(label=spec.strip())
    for part in (p.strip() for p in spec.split("+")):
        if part.lower().startswith("cpu"):
            _apply_cpu(hw, part, spec)
        else:
            _apply_gpu(hw, part, spec)
    if hw.accelerator is None and hw.host_ram_gb is None:
        raise HardwareSpecError(f"{spec!r} names no GPU and no cpu:<RAM>")
    if hw.boxes > 1 and hw.host_ram_gb is not None:
        hw.host_ram_gb *= hw.boxes
    return hw


def _apply_cpu(hw: HardwareSpec, part: str, spec: str) -> None:
    """Set the host-memory side of `hw` from a 'cpu:1024G[@0.6TB/s]' part."""
    match = _CPU_RE.match(part)
    if not match:
        raise HardwareSpecError(f"bad CPU part {part!r} in {spec!r}; write cpu:512G, cpu:2T or cpu:1024G@0.6TB/s")
    size = float(match.group(1)) * (1000 if match.group(2).upper() == "T" else 1)
    hw.host_ram_gb = size
    hw.host_bandwidth_tbs = float(match.group(3)) if match.group(3) else CPU_HOST["bandwidth_tbs"]
    hw.host_bf16_tflops = CPU_HOST["bf16_tflops"]
    if not match.group(3):
        hw.notes.append(f"host bandwidth/FLOP/s assumed: {CPU_HOST['source']}")


def _apply_gpu(hw: HardwareSpec, part: str, spec: str) -> None:
    """Set the accelerator side of `hw` from an 'NxNAME' or 'BxNxNAME' part."""
    match = _GPU_RE.match(part)
    if not match:
        raise HardwareSpecError(f"bad GPU part {part!r} in {spec!r}; write e.g. 8xH20, 2xRTX4090 or 2x8xH200")
    first, second, gpu = match.groups()
    boxes, per_box = (int(first), int(second)) if second else (1, int(first or 1))
    name = lookup_accelerator(gpu)
    if name is None:
        raise HardwareSpecError(f"unknown GPU {gpu!r} in part {part!r} of {spec!r}; "
                                f"known: {', '.join(ACCELERATORS)}")
    if per_box < 1 or boxes < 1:
        raise HardwareSpecError(f"GPU and box counts must be at least 1 in part {part!r} of {spec!r}")
    if per_box > GPUS_PER_BOX:
        raise HardwareSpecError(f"{per_box} GPUs in one box in part {part!r} of {spec!r}; a box carries at most "
                                f"{GPUS_PER_BOX}: write several boxes as {-(-per_box // GPUS_PER_BOX)}x{GPUS_PER_BOX}x{gpu}")
    if boxes > MAX_BOXES:
        raise HardwareSpecError(f"{boxes} boxes in part {part!r} of {spec!r}; the advisor plans at most {MAX_BOXES}")
    if hw.accelerator is not None:
        raise HardwareSpecError(f"second GPU part {part!r} in {spec!r}; mixed GPU models are not supported")
    hw.accelerator, hw.count, hw.boxes = ACCELERATORS[name], boxes * per_box, boxes


def lookup_accelerator(name: str) -> str | None:
    """Return the table key for a GPU name as users or drivers spell it ('NVIDIA H20' -> 'H20')."""
    key = name.upper().replace("NVIDIA", "").replace("GEFORCE", "").strip().replace(" ", "-")
    key = _ALIASES.get(key, key)
    if key in ACCELERATORS:
        return key
    # Driver names carry suffixes: 'H100-80GB-HBM3', 'A100-SXM4-80GB', 'RTX-4090'.
    for candidate in sorted(ACCELERATORS, key=len, reverse=True):
        base = candidate.split("-")[0]
        if key.startswith(base) or key.replace("-", "").startswith(candidate.replace("-", "")):
            if candidate.startswith("A100"):
                return "A100-40G" if "40" in key else "A100-80G"
            return candidate
    return None


def inventory(measure: bool = True) -> HardwareSpec:
    """Return this box: GPUs from torch.cuda (names matched to the table), host RAM from psutil."""
    ram_gb = psutil.virtual_memory().total / 1e9
    hw = HardwareSpec(label="this box", host_ram_gb=round(ram_gb, 1))
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_properties(i).name for i in range(torch.cuda.device_count())]
        key = lookup_accelerator(names[0])
        if key is not None:
            total = torch.cuda.get_device_properties(0).total_memory / 1e9
            table = ACCELERATORS[key]
            hw.accelerator = Accelerator(table.name, round(total, 1), table.bandwidth_tbs, table.bf16_tflops,
                                         table.source + "; memory as reported by the driver")
            hw.count = len(names)
            hw.label = f"{len(names)}x{key} (this box)"
        else:
            hw.notes.append(f"GPU {names[0]!r} is not in the datasheet table; planning as CPU-only")
    if hw.accelerator is None:
        hw.label = f"cpu:{ram_gb:.0f}G (this box)"
        if measure:
            hw.host_bandwidth_tbs, hw.host_bf16_tflops = measure_host()
            hw.notes.append("host bandwidth and FLOP/s measured on this box (torch copy and matmul)")
    return hw


def measure_host(size_mb: int = 256, repeats: int = 3) -> tuple[float, float]:
    """Return (TB/s, TFLOP/s) of this host, measured with a large copy and a float32 matmul."""
    src = torch.empty(size_mb * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    bandwidth = 2 * src.numel() * 4 / best / 1e12  # a copy reads and writes every byte
    n = 1024
    a, b = torch.ones(n, n), torch.ones(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return round(bandwidth, 4), round(2 * n**3 / best / 1e12, 4)
