"""Predictions for a deployment as asked, and every plan that works when it does not fit: offload, a narrower
dtype, more boxes with expert parallelism, and the distilled dense models beside them, all on the same workload.

Torch-free: it works on the throughput profiles a FitReport stores, so the console runs it from a stored report.
"""

from __future__ import annotations

from .calibration import params_for
from .datasheets import GPUS_PER_BOX
from .hardware import MAX_BOXES, HardwareSpec, parse_hardware
from .parallel import Plan, PlanError, default_plan, parse_plan
from .profile import ModelProfile
from .throughput import ENGINES, capacity, predict
from .workload import Workload

# Narrower checkpoints tried when the asked dtype does not fit, widest first.
NARROWER = ("fp8", "int4")
SUMMARY_KEYS = ("fits", "reason", "output_tokens_per_s", "total_tokens_per_s", "tpot_ms", "ttft_ms",
                "output_tokens_per_s_per_box", "output_tokens_per_s_per_user", "bound", "bound_output_tokens_per_s",
                "uncertainty", "kv_capacity_sequences", "concurrency", "note")


def default_engine(hw: HardwareSpec) -> str:
    """Return the engine planned when none is named: vLLM on GPUs, the appliance's own engine on a CPU box."""
    return "vllm" if hw.gpus else "builtin"


def check_engine(engine: str) -> str:
    """Return a known engine name or raise ValueError naming the choices."""
    key = (engine or "").strip().lower()
    if key not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    return key


def plan_for(profile: ModelProfile, hw: HardwareSpec, engine: str, plan: str | None, offload: bool = False) -> Plan:
    """Return the named plan checked against the hardware, or the engine's default plan."""
    if plan:
        return parse_plan(plan, hw.gpus)
    return default_plan(engine, hw.gpus, bool(profile.experts), profile.kv_heads == 1, offload)


def prediction(profile: ModelProfile, hw: HardwareSpec, workload: Workload, engine: str, plan: str | None = None) -> dict:
    """Return the predicted figures of one model on one deployment."""
    chosen = asked_plan(profile, hw, engine, plan, workload)
    return predict(profile, hw, chosen, engine, params_for(engine, hw, profile), workload)


def asked_plan(profile: ModelProfile, hw: HardwareSpec, engine: str, plan: str | None, workload: Workload) -> Plan:
    """Return the plan to predict: the named one, else the engine's usual one, else plain TP where the usual one
    does not fit (data-parallel attention keeps a copy of the attention weights on every GPU)."""
    chosen = plan_for(profile, hw, engine, plan)
    if plan or chosen.attention_dp == 1 or hw.gpus <= 1:
        return chosen
    kv = profile.kv_bytes_per_token_builtin if engine == "builtin" else profile.kv_bytes_per_token
    if capacity(profile, hw, chosen, workload.context, kv).fits:
        return chosen
    return parse_plan(f"tp{hw.gpus}", hw.gpus)


def _row(kind: str, profile: ModelProfile, hw: HardwareSpec, plan: Plan, engine: str, workload: Workload) -> dict:
    """Return one plan row: what it is, what it costs in GPUs, what it is predicted to deliver."""
    p = predict(profile, hw, plan, engine, params_for(engine, hw, profile), workload)
    return {"kind": kind, "model": profile.name, "dtype": profile.dtype, "hardware": hw.label, "plan": plan.label,
            "gpus": plan.gpus, "boxes": max(1, hw.boxes), "engine": engine,
            "predicted": {k: p[k] for k in SUMMARY_KEYS if k in p}}


def _host_part(hw: HardwareSpec) -> str:
    """Return the '+cpu:...G' part of a spec for the same host RAM per box, or ''."""
    if hw.host_ram_gb is None:
        return ""
    return f"+cpu:{hw.host_ram_gb / max(1, hw.boxes):g}G"


def plans(profiles: dict[str, ModelProfile], dtype: str, hw: HardwareSpec, workload: Workload, engine: str,
          plan: str | None = None, distilled: dict[str, ModelProfile] | None = None) -> list[dict]:
    """Return the asked deployment and the alternatives, each with predicted throughput and GPU cost."""
    profile = profiles[dtype]
    rows = []
    asked = asked_plan(profile, hw, engine, plan, workload)
    first = _row("as asked", profile, hw, asked, engine, workload)
    rows.append(first)
    if first["predicted"]["fits"]:
        if engine == "sglang" and profile.experts and not plan and asked.attention_dp > 1:
            rows.append(_row("tensor parallel attention", profile, hw, parse_plan(f"tp{hw.gpus}", hw.gpus), engine, workload))
    elif hw.gpus:
        rows += _when_it_does_not_fit(profiles, dtype, hw, workload, engine)
    for name, other in (distilled or {}).items():
        rows.append(_distilled_row(other, hw, workload, engine))
    return rows


def _when_it_does_not_fit(profiles, dtype, hw: HardwareSpec, workload: Workload, engine: str) -> list[dict]:
    """Return the offload, narrower-dtype and more-boxes plans (those that do not fit say why)."""
    profile = profiles[dtype]
    rows = []
    if profile.experts:
        rows.append(_row("offload experts to host RAM", profile, hw,
                         default_plan(engine, hw.gpus, True, profile.kv_heads == 1, offload=True), engine, workload))
    asked_gb = profile.weight_gb
    for narrow in NARROWER:
        other = profiles.get(narrow)
        if other is None or other.weight_gb >= asked_gb * 0.95:
            continue
        row = _row(f"lower precision ({narrow})", other, hw, default_plan(engine, hw.gpus, bool(other.experts),
                                                                         other.kv_heads == 1), engine, workload)
        rows.append(row)
        if row["predicted"]["fits"]:
            break
    per_box = hw.gpus_per_box or GPUS_PER_BOX
    for boxes in range(max(2, hw.boxes + 1), MAX_BOXES + 1):
        bigger = parse_hardware(f"{boxes}x{per_box}x{hw.accelerator.name}{_host_part(hw)}")
        gpus = bigger.gpus
        layout = parse_plan(f"ep{gpus}", gpus) if profile.experts else parse_plan(f"tp{gpus}", gpus)
        row = _row(f"{boxes} boxes, {'EP' if profile.experts else 'TP'}{gpus}", profile, bigger, layout, engine, workload)
        if row["predicted"]["fits"]:
            rows.append(row)
            break
    return rows


def _distilled_row(profile: ModelProfile, hw: HardwareSpec, workload: Workload, engine: str) -> dict:
    """Return the distilled model on the same box: replicas of the fewest GPUs that hold it and the workload's users."""
    gpus = max(1, hw.gpus)
    best = None
    tp = 1
    while tp <= gpus:
        if gpus % tp == 0:
            try:
                label = f"tp{tp}" if tp == gpus else f"dp{gpus // tp}-tp{tp}"
                layout = parse_plan(label if hw.gpus else "tp1", hw.gpus)
            except PlanError:
                layout = None
            if layout is not None:
                row = _row("distilled", profile, hw, layout, engine, workload)
                p = row["predicted"]
                if p["fits"] and (best is None or p["output_tokens_per_s"] > best["predicted"]["output_tokens_per_s"]):
                    best = row
        tp *= 2
    if best is None:  # nothing fits: show why with the widest split
        best = _row("distilled", profile, hw, parse_plan(f"tp{gpus}" if hw.gpus else "tp1", hw.gpus), engine, workload)
    return best
