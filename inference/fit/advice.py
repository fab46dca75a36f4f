"""The throughput advice of a FitReport: predicted figures for a workload, the plans, and the chart's data.

Used by the `fit` command (with a FitReport) and by the console (with a stored report's dict); both name the
workload, engine and plan the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from . import alternatives, calibration
from .hardware import HardwareSpec, parse_hardware
from .profile import ModelProfile
from .report import analyze
from .source import DISTILLED, is_full_size
from .workload import Workload, parse_workload

CHART_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Request:
    """What the planner asked: a workload, and optionally the engine and the parallel plan."""

    workload: Workload | None
    engine: str | None = None
    plan: str | None = None


def parse_request(workload: str | None, engine: str | None, plan: str | None) -> Request:
    """Return the checked request (a bad workload, engine or plan raises ValueError naming it)."""
    return Request(parse_workload(workload) if workload else None,
                   alternatives.check_engine(engine) if engine else None, (plan or "").strip() or None)


def _dtype_key(dtype: str) -> str:
    """Return the profiles' key for a report's dtype label ('stored (fp8)' -> 'stored')."""
    return "stored" if dtype.startswith("stored") else dtype


def _profiles(report) -> tuple[dict[str, ModelProfile], str, str, str]:
    """Return (profiles by dtype, chosen dtype key, model_type, name) of a FitReport or its stored dict."""
    data = report if isinstance(report, dict) else None
    stored = data["profiles"] if data else report.profiles
    if not stored:
        raise ValueError("this report has no throughput profiles; analyse the variant again")
    profiles = {k: ModelProfile.from_dict(v) for k, v in stored.items()}
    dtype = data["dtype"] if data else report.dtype
    model_type = data["parameters"]["model_type"] if data else report.accounting.model_type
    name = data["name"] if data else report.name
    return profiles, _dtype_key(dtype), model_type, name


@lru_cache(maxsize=8)
def distilled_profile(name: str) -> ModelProfile:
    """Return the stored-dtype profile of a shipped distilled model (built once on the meta device)."""
    return ModelProfile.from_dict(analyze(name, "cpu:64G", 4096, "stored").profiles["stored"])


def distilled_for(model_type: str, name: str, total_params: int) -> dict[str, ModelProfile]:
    """Return the distilled alternatives of a full-size model of a family, by name (none otherwise)."""
    if not is_full_size(model_type, total_params):
        return {}
    return {d: distilled_profile(d) for d in DISTILLED.get(model_type, ()) if d != name}


def advise(report, request: Request, hw: HardwareSpec | None = None) -> dict:
    """Return {"predicted", "plans", "calibration"} for a report (FitReport or stored dict) and a request."""
    profiles, dtype, model_type, name = _profiles(report)
    if hw is None:
        hw = report.hardware if not isinstance(report, dict) else parse_hardware(report["hardware"]["label"])
    engine = request.engine or alternatives.default_engine(hw)
    profile = profiles[dtype]
    predicted = alternatives.prediction(profile, hw, request.workload, engine, request.plan)
    rows = alternatives.plans(profiles, dtype, hw, request.workload, engine, request.plan,
                              distilled_for(model_type, name, profile.total_params))
    return {"predicted": predicted, "plans": rows, "calibration": calibration_summary()}


def calibration_summary() -> dict:
    """Return the stored factors and the sources they were fitted to, for the report."""
    data = calibration.load_points()
    return {"fitted": calibration.load_fitted(), "sources": data["sources"],
            "points": [{k: p[k] for k in ("id", "role", "engine", "hardware", "plan", "workload", "measured")}
                       for p in data["points"]]}


def _fmt(x: float | None, unit: str = "") -> str:
    """Return a figure with thousands separators."""
    return "-" if x is None else f"{x:,.0f}{unit}" if x >= 100 else f"{x:,.1f}{unit}"


def format_prediction(advice: dict) -> str:
    """Return the prediction and the plans as readable text for the CLI."""
    p = advice["predicted"]
    w = p["workload"]
    users = f"{w['concurrency']} users" if w["rate_per_s"] is None else f"{w['rate_per_s']:g} requests/s"
    lines = ["", f"  PREDICTED    {p['model']} ({p['dtype']}) on {p['hardware']}, {p['engine']} {p['plan']['label']}: "
                 f"{w['input_tokens']} in / {w['output_tokens']} out, {users}"]
    if not p["fits"]:
        lines.append(f"    does not fit: {p['reason']}")
    else:
        u = p["uncertainty"]
        lines += [
            f"    output {_fmt(p['output_tokens_per_s'])} tokens/s (±{u['relative']:.0%}: {_fmt(u['output_tokens_per_s_low'])}"
            f"-{_fmt(u['output_tokens_per_s_high'])}), total {_fmt(p['total_tokens_per_s'])} tokens/s, "
            f"{_fmt(p['output_tokens_per_s_per_box'])} per box",
            f"    TPOT {_fmt(p['tpot_ms'])} ms, TTFT {_fmt(p['ttft_ms'])} ms, {_fmt(p['output_tokens_per_s_per_user'])} tokens/s "
            f"per user; bound by {p['bound']} (roofline {_fmt(p['bound_output_tokens_per_s'])} tokens/s)",
            f"    {u['basis']}",
        ]
        if p.get("note"):
            lines.append(f"    note: {p['note']}")
    lines.append("  PLANS")
    for row in advice["plans"]:
        q = row["predicted"]
        figure = (f"{_fmt(q['output_tokens_per_s'])} tokens/s (±{q['uncertainty']['relative']:.0%}), "
                  f"TPOT {_fmt(q['tpot_ms'])} ms" if q["fits"] else f"does not fit: {q['reason']}")
        lines.append(f"    {row['kind']:<30} {row['model']} {row['dtype']} on {row['hardware']} {row['plan']} "
                     f"({row['gpus']} GPUs): {figure}")
    return "\n".join(lines)


def curves(report, request: Request, hw: HardwareSpec | None = None) -> dict:
    """Return the chart's data: predicted per-box output tokens/s against users per box, for the asked
    deployment and (for MoE) an expert-parallel cluster, plus the published points with their predictions."""
    profiles, dtype, model_type, name = _profiles(report)
    if hw is None:
        hw = report.hardware if not isinstance(report, dict) else parse_hardware(report["hardware"]["label"])
    engine = request.engine or alternatives.default_engine(hw)
    profile = profiles[dtype]
    series = [_series(f"{hw.label}, {engine}", profile, hw, request, engine, request.plan)]
    cluster = _cluster(profile, hw)
    if cluster is not None:
        series.append(_series(f"{cluster.label}, {engine} EP{cluster.gpus}", profile, cluster, request, engine,
                              f"ep{cluster.gpus}"))
    return {"title": f"{name} ({profile.dtype}): {request.workload.input_tokens} in / "
                     f"{request.workload.output_tokens} out", "series": series, "published": _published(model_type, profile.total_params)}


def _cluster(profile: ModelProfile, hw: HardwareSpec) -> HardwareSpec | None:
    """Return the smallest several-box deployment of the same GPUs an MoE model could use, or None."""
    if not profile.experts or not hw.accelerator:
        return None
    per_box = hw.gpus_per_box or 1
    boxes = max(2, hw.boxes * 2)
    return parse_hardware(f"{boxes}x{per_box}x{hw.accelerator.name}")


def _series(label: str, profile: ModelProfile, hw: HardwareSpec, request: Request, engine: str, plan: str | None) -> dict:
    """Return one curve: per-box output tokens/s and its uncertainty band at each number of users per box."""
    boxes = max(1, hw.boxes)
    xs, ys, lo, hi = [], [], [], []
    for users in CHART_CONCURRENCY:
        p = alternatives.prediction(profile, hw, request.workload.with_concurrency(users * boxes), engine, plan)
        if not p["fits"]:
            break
        xs.append(users)
        ys.append(p["output_tokens_per_s_per_box"])
        lo.append(p["uncertainty"]["output_tokens_per_s_low"] / boxes)
        hi.append(p["uncertainty"]["output_tokens_per_s_high"] / boxes)
    return {"label": label, "users_per_box": xs, "output_per_box": ys, "low": lo, "high": hi}


def _published(model_type: str, total_params: int) -> list[dict]:
    """Return the published points of this model family: measured, and predicted for their own configuration."""
    if model_type != "deepseek_v3" or not is_full_size(model_type, total_params):
        return []
    rows = []
    for point in calibration.load_points()["points"]:
        hw = parse_hardware(point["hardware"])
        boxes = max(1, hw.boxes)
        measured = point["measured"]
        per_box = measured.get("output_tokens_per_s_per_box") or measured["output_tokens_per_s"] / boxes
        row = {"id": point["id"], "role": point["role"], "engine": point["engine"], "hardware": point["hardware"],
               "measured_per_box": per_box, "users_per_box": None, "predicted_per_box": None}
        if calibration.scored(point):
            entry = calibration.load_fitted()[point["engine"]][calibration.hardware_class(hw)]
            pred = calibration.predict_point(point, _point_profile(point["model"], point["dtype"]),
                                             calibration.stored_params(entry))
            row.update(users_per_box=point["workload"]["concurrency"] / boxes,
                       predicted_per_box=pred["output_tokens_per_s"] / boxes,
                       workload=f"{point['workload']['input_tokens']}/{point['workload']['output_tokens']}")
        elif "output_tokens_per_s_per_user" in measured:
            row["users_per_box"] = per_box / measured["output_tokens_per_s_per_user"]  # Little's law
        rows.append(row)
    return rows


@lru_cache(maxsize=4)
def _point_profile(model: str, dtype: str) -> ModelProfile:
    """Return the profile published points of `model` were measured with (built once on the meta device)."""
    return calibration.load_profiles({(model, dtype)})[model, dtype]


def throughput_chart(report, request: Request, hw: HardwareSpec | None = None) -> str:
    """Return the SVG of predicted throughput against concurrency with the published points drawn on it."""
    from .charts import render_throughput_chart  # here: the drawing code loads only to draw

    return render_throughput_chart(curves(report, request, hw))
