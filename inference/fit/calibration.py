"""Fit the throughput model's efficiency factors to published measurements, and say how far to trust them.

calibration/points.json holds the measurements, each with its source and configuration, marked `fit` (used
to fit), `held_out` (never used to fit: their error is the honest figure) or `reference` (drawn, not scored).
calibration/fitted.json holds the factors per engine and hardware class as `bench/advisor_holdout.py --write`
fitted them; the advisor reads them from there and never fits at run time.
"""

from __future__ import annotations

import itertools
import json
import math
from functools import lru_cache
from pathlib import Path

from .hardware import HardwareSpec, parse_hardware
from .parallel import parse_plan
from .profile import ModelProfile
from .report import analyze
from .throughput import EngineParams, predict
from .workload import Workload

DATA_DIR = Path(__file__).with_name("calibration")
POINTS_FILE = DATA_DIR / "points.json"
FITTED_FILE = DATA_DIR / "fitted.json"
HOPPER = frozenset({"H100", "H200", "H800", "H20"})
# Every factor is searched on a log grid between these bounds, then refined around the best cell.
GRID = {"bw_efficiency": (0.05, 1.0), "layer_overhead_us": (2.0, 1000.0), "mfu": (0.01, 0.8),
        "request_overhead_ms": (0.01, 100.0)}
FACTORS = tuple(GRID)
GRID_STEPS, REFINE_STEPS = 12, 7
DONE_WHEN = 0.35
UNCERTAINTY_FLOOR = 0.15  # the held-out points must land within +-35%


def hardware_class(hw: HardwareSpec) -> str:
    """Return the class efficiency factors are fitted per: hopper, other-gpu or cpu."""
    if hw.accelerator is None:
        return "cpu"
    return "hopper" if hw.accelerator.name in HOPPER else "other-gpu"


@lru_cache(maxsize=1)
def load_points() -> dict:
    """Return the calibration data: sources and points."""
    return json.loads(POINTS_FILE.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def load_fitted() -> dict:
    """Return the stored factors per engine and hardware class."""
    return json.loads(FITTED_FILE.read_text(encoding="utf-8"))


# Engines without published points to fit: the appliance's own engine (transformers, eager, one step per token,
# no fused MoE or paged attention) is planned with assumed factors and a wide uncertainty.
ASSUMED = {"builtin": EngineParams(0.3, 100.0, 0.2, 1.0, 1.0, "assumed (no published measurements of this engine); "
                                                          "±100%")}


def engine_params(engine: str, hw: HardwareSpec) -> EngineParams:
    """Return the fitted factors of `engine` for the class of `hw`, widened when extrapolated to another class."""
    cls = hardware_class(hw)
    fitted = load_fitted().get(engine, {})
    if cls in fitted:
        return _params(fitted[cls], f"fitted to {fitted[cls]['points']} published points ({engine}, {cls})")
    if engine in ASSUMED:
        return ASSUMED[engine]
    if "hopper" in fitted:
        f = fitted["hopper"]
        # Another class: the Hopper factors, with the uncertainty doubled, since no point measured this class.
        p = _params(f, f"extrapolated from {engine} on Hopper ({f['points']} points) to {cls}; uncertainty doubled")
        return EngineParams(p.bw_efficiency, p.layer_overhead_us, p.mfu, p.request_overhead_ms,
                            2 * p.uncertainty + 0.25, p.basis)
    raise ValueError(f"no efficiency factors for engine {engine!r}; known: {', '.join(sorted(load_fitted()))}")


def params_for(engine: str, hw: HardwareSpec, profile: ModelProfile) -> EngineParams:
    """Return the factors for one model: widened when it is of a kind (dense, MoE) no fitted point measured."""
    params = engine_params(engine, hw)
    kinds = {p["kind"] for p in load_points()["points"] if p["role"] == "fit" and p["engine"] == engine}
    kind = "moe" if profile.experts else "dense"
    if not kinds or kind in kinds:
        return params
    return EngineParams(params.bw_efficiency, params.layer_overhead_us, params.mfu, params.request_overhead_ms,
                        2 * params.uncertainty + 0.25,
                        params.basis + f"; extrapolated to a {kind} model (fitted on {', '.join(sorted(kinds))} only): "
                                       "uncertainty doubled")


def _params(entry: dict, basis: str) -> EngineParams:
    """Return EngineParams from one stored entry."""
    return EngineParams(entry["bw_efficiency"], entry["layer_overhead_us"], entry["mfu"], entry["request_overhead_ms"],
                        entry["uncertainty"], basis)


def stored_params(entry: dict) -> EngineParams:
    """Return the factors of one entry of fitted.json."""
    return _params(entry, "stored")


def scored(point: dict) -> bool:
    """Return whether a point is fully configured (reference points are not)."""
    return point["role"] in ("fit", "held_out")


def workload_of(point: dict) -> Workload:
    """Return the workload a point was measured under."""
    w = point["workload"]
    return Workload(w["input_tokens"], w["output_tokens"], w["concurrency"], None, 0.0, w["arrival"],
                    w.get("output_spread", "fixed"))


def predict_point(point: dict, profile: ModelProfile, params: EngineParams) -> dict:
    """Return the model's prediction for the configuration of one published point."""
    hw = parse_hardware(point["hardware"])
    plan = parse_plan(point["plan"], hw.gpus)
    return predict(profile, hw, plan, point["engine"], params, workload_of(point), tight_memory=False)


def error(predicted: float, measured: float) -> float:
    """Return the relative error of a prediction against a measurement (+0.10: 10% too high)."""
    return predicted / measured - 1.0


def _loss(points: list[dict], profiles: dict, params: EngineParams) -> float:
    """Return the summed squared log error over the points' output tokens/s (and TPOT where a closed loop gives it)."""
    total = 0.0
    for point in points:
        pred = predict_point(point, profiles[point["model"], point["dtype"]], params)
        if not pred["fits"]:
            return math.inf
        total += math.log(pred["output_tokens_per_s"] / point["measured"]["output_tokens_per_s"]) ** 2
        if point["workload"]["arrival"] == "closed" and "tpot_ms" in point["measured"]:
            total += math.log(pred["tpot_ms"] / point["measured"]["tpot_ms"]) ** 2
    return total


def _grid(lo: float, hi: float, steps: int) -> list[float]:
    """Return `steps` values spaced evenly in log between lo and hi."""
    return [lo * (hi / lo) ** (i / (steps - 1)) for i in range(steps)]


def fit_engine(points: list[dict], profiles: dict, checks: list[dict] | None = None) -> dict:
    """Return the factors minimising the log error over `points` (a grid search, refined twice: deterministic)."""
    bounds = dict(GRID)
    best: tuple[float, tuple | None] = (math.inf, None)
    for round_ in range(3):
        axes = [_grid(*bounds[k], GRID_STEPS if round_ == 0 else REFINE_STEPS) for k in FACTORS]
        for values in itertools.product(*axes):
            loss = _loss(points, profiles, EngineParams(*values, 0.0, "fit"))
            if loss < best[0]:
                best = (loss, values)
        # Refine around the best value, one coarse cell either side, inside the original bounds.
        width = (GRID["layer_overhead_us"][1] / GRID["layer_overhead_us"][0]) ** (1 / (GRID_STEPS - 1)) if round_ == 0 else 1.3
        bounds = {k: (max(GRID[k][0], v / width), min(GRID[k][1], v * width)) for k, v in zip(FACTORS, best[1])}
    params = EngineParams(*best[1], 0.0, "fit")
    # The stated uncertainty: the largest error on any scored point of this engine and class, the held-out
    # ones included (they check the factors, they do not move them), rounded up to 5%, and never under
    # UNCERTAINTY_FLOOR: a handful of points cannot vouch for more.
    errors = [abs(error(predict_point(p, profiles[p["model"], p["dtype"]], params)["output_tokens_per_s"],
                        p["measured"]["output_tokens_per_s"])) for p in points + (checks or [])]
    uncertainty = max(UNCERTAINTY_FLOOR, math.ceil(max(errors) * 20 - 1e-9) / 20)
    fitted = {k: round(v, 4) for k, v in zip(FACTORS, best[1])}
    return {**fitted, "uncertainty": uncertainty, "points": len(points),
            "rms_log_error": round(math.sqrt(best[0] / len(points)), 4), "fitted_on": [p["id"] for p in points]}


def fit_all(profiles: dict) -> dict:
    """Return fitted factors for every engine and hardware class that has `fit` points."""
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for point in load_points()["points"]:
        if scored(point):
            key = point["engine"], hardware_class(parse_hardware(point["hardware"]))
            groups.setdefault(key, {"fit": [], "held_out": []})[point["role"]].append(point)
    out: dict[str, dict] = {}
    for (engine, cls), roles in sorted(groups.items()):
        if roles["fit"]:
            out.setdefault(engine, {})[cls] = fit_engine(roles["fit"], profiles, roles["held_out"])
    return out


def evaluate(profiles: dict, fitted: dict | None = None) -> list[dict]:
    """Return, per scored point, measured and predicted figures and the error, under the stored (or given) factors."""
    fitted = fitted or load_fitted()
    rows = []
    for point in load_points()["points"]:
        if not scored(point):
            continue
        hw = parse_hardware(point["hardware"])
        entry = fitted[point["engine"]][hardware_class(hw)]
        pred = predict_point(point, profiles[point["model"], point["dtype"]], stored_params(entry))
        measured = point["measured"]
        rows.append({"id": point["id"], "role": point["role"], "engine": point["engine"], "plan": point["plan"],
                     "workload": point["workload"], "measured": measured,
                     "predicted": {k: pred[k] for k in ("output_tokens_per_s", "total_tokens_per_s", "tpot_ms", "ttft_ms")},
                     "bound": pred["bound"], "uncertainty": entry["uncertainty"],
                     "error": error(pred["output_tokens_per_s"], measured["output_tokens_per_s"]),
                     "error_total": error(pred["total_tokens_per_s"], measured["total_tokens_per_s"])})
    return rows


def needed_profiles() -> set[tuple[str, str]]:
    """Return the (model, dtype) pairs the scored points use."""
    return {(p["model"], p["dtype"]) for p in load_points()["points"] if scored(p)}


def load_profiles(pairs=None) -> dict:
    """Return the throughput profile of each (model, dtype), built on the meta device (needs torch)."""
    out = {}
    for model, dtype in sorted(pairs or needed_profiles()):
        report = analyze(model, "cpu:64G", 4096, dtype)
        out[model, dtype] = ModelProfile.from_dict(report.profiles[dtype])
    return out
