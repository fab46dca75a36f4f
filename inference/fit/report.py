"""Put accounting, memory, activation, verdict and expert maths together into one FitReport."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from . import experts as ex
from .accounting import Accounting, account, meta_model_for
from .activation import meta_forward_peak
from .hardware import HardwareSpec, inventory, parse_hardware
from .profile import build_profile
from .memory import DTYPE_BYTES, PLANNED_DTYPES, KvLayout, kv_layout, normalise_dtype, weight_bytes
from .roofline import (GB, OFFLOAD, RUNTIME_RESERVE_GB_PER_GPU, ActivationModel, Budget, decode_bound,
                       prefill_bound, step_cost, verdict)
from .source import ModelSource, config_from_dict, load_source

DECODE_BATCHES = (1, 8, 32, 128, 512)
EXPERT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
KV_BYTES = 2.0  # the engine keeps its cache in the compute dtype, bf16


@dataclass
class FitReport:
    """Everything the advisor says about one variant on one box; to_dict() is what the registry stores."""

    name: str
    hardware: HardwareSpec
    context: int
    dtype: str
    accounting: Accounting
    weights_gb: dict[str, float]
    weights_by_component_gb: dict[str, float]
    kv: KvLayout
    kv_bytes_per_token: dict[str, float]
    activation: ActivationModel
    reserve_gb: float
    verdict: dict
    decode: list[dict]
    prefill_tokens_per_s: float | None
    experts: dict | None
    notes: list[str] = field(default_factory=list)
    profiles: dict[str, dict] = field(default_factory=dict)  # throughput profile per planned dtype

    def to_dict(self) -> dict:
        """Return the report as JSON-ready values."""
        return {
            "name": self.name, "hardware": self.hardware.to_dict(), "context": self.context, "dtype": self.dtype,
            "parameters": self.accounting.to_dict(), "weights_gb": self.weights_gb,
            "weights_by_component_gb": self.weights_by_component_gb,
            "kv_bytes_per_token": self.kv_bytes_per_token, "kv_layout": self.kv.layout,
            "activation": vars(self.activation), "reserve_gb": self.reserve_gb, "verdict": self.verdict,
            "decode": self.decode, "prefill_tokens_per_s": self.prefill_tokens_per_s, "experts": self.experts,
            "notes": self.notes, "profiles": self.profiles,
        }


@lru_cache(maxsize=16)
def _activation_model(config_json: str, prefill_tokens: int) -> ActivationModel:
    """Return the meta-measured activation model of an architecture (cached: about a second per forward)."""
    model = meta_model_for(config_from_dict(json.loads(config_json)), torch.bfloat16)
    prefill = meta_forward_peak(model, 1, prefill_tokens)
    # Two decode steps that differ only in batch give the per-(sequence x cached token) slope.
    # A wide spread (1 vs 16 sequences) keeps the slope's relative noise small.
    ctx, wide = 512, 16
    one, many = meta_forward_peak(model, 1, 1, ctx), meta_forward_peak(model, wide, 1, ctx)
    slope = max(0.0, (many.transient_bytes - one.transient_bytes) / ((wide - 1) * ctx))
    base = max(0.0, one.transient_bytes - slope * ctx)
    return ActivationModel(float(prefill.transient_bytes), prefill_tokens, base, slope)


def analyze(source: str | Path | ModelSource, hardware: str | HardwareSpec | None = None, context: int = 4096,
            dtype: str = "stored", reserve_gb_per_gpu: float = RUNTIME_RESERVE_GB_PER_GPU,
            prefill_chunk: int = 2048, ep_gpus: int = ex.DEEPSEEK_DECODE_UNIT_GPUS) -> FitReport:
    """Return the FitReport of a model (dir, config.json or known name) on a box (spec string or inventory)."""
    src = source if isinstance(source, ModelSource) else load_source(source)
    hw = inventory() if hardware is None else parse_hardware(hardware) if isinstance(hardware, str) else hardware
    dtype = normalise_dtype(dtype)
    model = meta_model_for(src.config, torch.bfloat16)
    acc = account(model)
    plans = {d: weight_bytes(acc, d, src.quantization, src.stored_dtype) for d in PLANNED_DTYPES}
    chosen = plans[dtype]
    layout = kv_layout(model)
    kv = layout.bytes_per_token(KV_BYTES)
    act = _activation_model(src.config.to_json_string(use_diff=False), min(context, prefill_chunk))
    reserve = reserve_gb_per_gpu * hw.gpus
    budget = Budget(chosen.total, chosen.by_component.get("routed_experts", 0.0), kv["engine"], act, reserve * GB)
    fit = verdict(budget, hw, context)
    cost = step_cost(acc, chosen.by_component, src.config, layout.layout == "mla-latent")
    # Larger batches than the memory holds are not offered: the box could not run them.
    limit = max(1, fit["max_concurrent"])
    batches = sorted({*(b for b in DECODE_BATCHES if b <= limit), limit})
    decode = [decode_bound(cost, kv["engine"], hw, b, context, offload=fit["verdict"] == OFFLOAD) for b in batches]
    report = FitReport(
        name=src.name, hardware=hw, context=context, dtype=chosen.dtype, accounting=acc,
        weights_gb={d: w.total / GB for d, w in plans.items()},
        weights_by_component_gb={k: v / GB for k, v in chosen.by_component.items()},
        kv=layout, kv_bytes_per_token=kv, activation=act, reserve_gb=reserve, verdict=fit, decode=decode,
        prefill_tokens_per_s=prefill_bound(cost, hw, context), experts=None, notes=list(hw.notes),
        profiles={d: build_profile(src.name, acc, w.by_component, w.dtype, src.config, kv).to_dict()
                  for d, w in plans.items()},
    )
    if acc.moe:
        bytes_per_param = DTYPE_BYTES.get(chosen.dtype.split("(")[-1].rstrip(")"), 2.0)
        accel = hw.accelerator
        ridge = (accel.bf16_tflops / accel.bandwidth_tbs) if accel else (hw.bf16_tflops or 1) / (hw.bandwidth_tbs or 1)
        report.experts = ex.expert_table(acc.moe.experts, acc.moe.top_k, list(EXPERT_BATCHES), max(1, hw.gpus),
                                         ep_gpus, ridge, bytes_per_param)
    _add_notes(report, src)
    return report


def _add_notes(report: FitReport, src: ModelSource) -> None:
    """Record how the figures were counted, so the console can show it next to them."""
    acc = report.accounting
    if acc.mtp_params:
        report.notes.append(
            f"total excludes the {acc.mtp_params / 1e9:.1f}B-parameter MTP module (num_nextn_predict_layers), which "
            f"transformers does not build or load; the checkpoint on disk holds {acc.on_disk_total / 1e9:.1f}B")
    report.notes.append("active = parameters one token multiplies by (k of E routed experts, shared experts, "
                        "attention, head); the input embedding is a lookup and is not counted")
    if report.kv.layout == "mla-latent":
        report.notes.append("this transformers release caches the MLA latent and re-expands per-head K/V at every "
                            "step: small cache, but a decode transient and FLOPs that grow with batch x context")
    report.notes.append(f"runtime reserve {RUNTIME_RESERVE_GB_PER_GPU:g} GB per GPU is an allowance (CUDA context, "
                        "workspaces), not a measurement; activations are measured by a meta-device forward")


def _n(count: float) -> str:
    """Return a parameter count in B, M or K, whichever reads best."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.{2 if unit == 'B' and count < 1e11 else 1}f}{unit}"
    return f"{count:.0f}"


def format_text(report: FitReport) -> str:
    """Return the report as readable text for the CLI."""
    acc, v, hw = report.accounting, report.verdict, report.hardware
    lines = [
        f"{report.name} on {hw.label}  (context {report.context}, weights {report.dtype})",
        f"  parameters   total {_n(acc.total)} ({acc.total:,}), active per token {_n(acc.active)} "
        f"({_n(acc.active_with_embedding)} with embedding)"
        + (f", on disk with MTP {_n(acc.on_disk_total)}" if acc.mtp_params else ""),
        "  by component " + ", ".join(f"{k} {_n(n)}" for k, n in acc.by_component.items() if n),
        "  weights      " + ", ".join(f"{d} {gb:.1f} GB" for d, gb in report.weights_gb.items()),
        f"  KV per token engine {report.kv_bytes_per_token['engine'] / 1e3:.1f} KB ({report.kv.layout}), "
        f"per-head K/V {report.kv_bytes_per_token['per_head'] / 1e6:.2f} MB, "
        f"latent {report.kv_bytes_per_token['latent'] / 1e3:.1f} KB",
        f"  activations  prefill chunk of {report.activation.prefill_tokens} tokens "
        f"{report.activation.prefill_bytes / 1e9:.2f} GB; decode {report.activation.decode_bytes_per_seq_token / 1e3:.1f} "
        f"KB per sequence-token (meta-device forward); reserve {report.reserve_gb:.0f} GB",
        f"  memory       {hw.device_memory_gb:.0f} GB on device; one sequence needs {v['need_gb_one_sequence']:.1f} GB",
        f"  VERDICT      {v['verdict']}, margin {v['margin_gb']:+.1f} GB"
        + (f", host RAM for experts {v['host_ram_needed_gb']:.0f} GB" if v['host_ram_needed_gb'] else "")
        + f"; max concurrent sequences at {report.context}: {v['max_concurrent']}",
    ]
    if report.prefill_tokens_per_s:
        lines.append(f"  prefill      <= {report.prefill_tokens_per_s:,.0f} tokens/s (peak BF16 FLOP/s)")
    for row in report.decode:
        if row.get("tokens_per_s"):
            lines.append(f"  decode B={row['batch']:<5} bandwidth roofline <= {row['tokens_per_s_memory']:>9,.0f} tok/s "
                         f"({row['bytes_per_step_gb']:.1f} GB/step, {row['experts_hit_per_layer']:.0f} experts/layer); "
                         f"this engine <= {row['tokens_per_s']:,.0f} ({row['bound']}-bound)")
    if report.experts:
        e = report.experts
        lines.append(f"  experts      {e['experts']} routed, {e['top_k']} per token; compute-bound from "
                     f"{e['compute_bound_tokens_per_expert']:.0f} tokens per expert = step batch "
                     f"{e['step_batch_for_compute_bound']}")
        box_label = f"box({e['gpus_box']} GPU)" if report.hardware.gpus else "box(CPU)"
        for row in e["rows"]:
            if row["seqs_per_gpu"] in (1, 8, 32, 128):
                bx, ep = row["box"], row["ep"]
                lines.append(f"    {row['seqs_per_gpu']:>4} seq/GPU  {box_label}: idle "
                             f"{bx['idle_fraction']:.0%}, {bx['tokens_per_working_expert']:.1f} tok/expert | "
                             f"EP{e['gpus_ep']}: idle {ep['idle_fraction']:.0%}, "
                             f"{ep['tokens_per_working_expert']:.1f} tok/expert")
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)
