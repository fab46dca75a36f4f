"""The fit advisor in the registry: predictions made by the worker, measurements made by the web process.

Predictions come from config.json alone (inference.fit builds the model on the
meta device); measurements come from the engine that really holds the weights.
Both are stored so the console shows them side by side.
"""
import logging
import time
from pathlib import Path
from types import SimpleNamespace

from django.conf import settings
from django.db import transaction

from audit import ledger

from .models import Deployment, FitAnalysis, ModelVariant

log = logging.getLogger(__name__)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def charts_dir(variant: ModelVariant) -> Path:
    return Path(settings.APPLIANCE_HOME) / "fit" / variant.name


def run_fit(variant_id: int) -> None:
    """Analyse a stored variant for this box (or the planning spec in settings) and store the report."""
    from inference.fit import analyze, render_expert_chart, render_memory_chart

    variant = ModelVariant.objects.filter(pk=variant_id).first()
    if variant is None or not variant.store_path:
        return
    started = time.monotonic()
    report = analyze(Path(variant.store_path), settings.FIT_HARDWARE or None, settings.FIT_CONTEXT)
    out = charts_dir(variant)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.png").write_bytes(render_memory_chart(report))
    if report.experts:
        (out / "experts.png").write_bytes(render_expert_chart(report))
    summary = report.to_dict()
    with transaction.atomic():
        FitAnalysis.objects.update_or_create(variant=variant, defaults={
            "hardware": summary["hardware"]["label"], "context": report.context, "report": summary,
            "verdict": report.verdict["verdict"], "margin_gb": report.verdict["margin_gb"],
            "max_concurrent": report.verdict.get("max_concurrent") or 0})
        ledger.append("variant.fit", actor="system:worker", target=variant.name, details={
            "hardware": summary["hardware"]["label"], "context": report.context, "verdict": report.verdict["verdict"],
            "duration_ms": int((time.monotonic() - started) * 1000)})


def measure_deployment(deployment_id: int, engine) -> None:
    """Record what the loaded engine really allocated, next to the advisor's prediction."""
    from inference.fit import count_parameters, measure_kv_bytes_per_token, measure_weights

    model, tokenizer = engine.model, engine.tokenizer
    measured = {
        "parameters": count_parameters(model),
        "weights": measure_weights(model),
        "kv": measure_kv_bytes_per_token(model, tokenizer),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    Deployment.objects.filter(pk=deployment_id).update(measured=measured)


def predicted_vs_measured(variant: ModelVariant) -> list[dict]:
    """Return rows of (figure, predicted, measured, difference) for the console."""
    fit = getattr(variant, "fit", None)
    deployment = getattr(variant, "deployment", None)
    if fit is None or deployment is None or not deployment.measured:
        return []
    report, measured = fit.report, deployment.measured
    dtype = measured["dtype"]
    rows = [("parameters", report["parameters"]["total"], measured["parameters"], 0.0)]
    # The engine loads bf16 on GPUs and float32 on CPUs (the demo models' stored dtype).
    weights_key = "bfloat16" if dtype == "bfloat16" else "stored"
    rows.append((f"weight bytes ({dtype})", report["weights_gb"][weights_key] * 1e9,
                 measured["weights"]["storage_bytes"], 0.02))
    # The advisor sizes the cache in bf16 (2 bytes an element); scale to the engine's dtype.
    kv_scale = DTYPE_BYTES.get(dtype, 2) / 2
    rows.append((f"KV bytes per token ({dtype})", report["kv_bytes_per_token"]["engine"] * kv_scale,
                 measured["kv"]["bytes_per_token"], 0.05))
    out = []
    for figure, predicted, actual, tolerance in rows:
        diff = (actual - predicted) / predicted if predicted else 0.0
        out.append({"figure": figure, "predicted": predicted, "measured": actual, "difference": diff,
                    "tolerance": tolerance, "within": abs(diff) <= tolerance})
    return out


def recommendation(users: int, context: int):
    """Return the advisor's pick among the registered variants that have a fit report."""
    from inference.fit import recommend

    reports = [
        SimpleNamespace(name=f.variant.name, verdict=f.report["verdict"], decode=f.report["decode"], context=context,
                        accounting=SimpleNamespace(total=f.report["parameters"]["total"]))
        for f in FitAnalysis.objects.select_related("variant")
    ]
    return recommend(reports, users) if reports else None


def live_telemetry(variant: ModelVariant) -> dict | None:
    """Return the loaded engine's router telemetry with the uniform-routing prediction beside it."""
    from inference import serving
    from inference.fit import experts_hit
    from inference.telemetry import render_expert_chart_svg, snapshot

    engine = serving.get(variant.name)
    if engine is None:
        return None
    snap = snapshot(engine)
    if not snap.get("moe"):
        return None
    experts, k = snap["num_experts"], snap["experts_per_token"]
    by_tokens: dict[int, list[float]] = {}
    for step in snap["recent"]:
        if step["idle_fraction"] is not None:
            by_tokens.setdefault(step["tokens"], []).append(experts * (1 - step["idle_fraction"]))
    hits = [{"tokens": tokens, "measured": sum(v) / len(v), "predicted": experts_hit(experts, k, tokens),
             "calls": len(v)} for tokens, v in sorted(by_tokens.items())]
    return {"snapshot": snap, "expert_hits": hits, "chart_svg": render_expert_chart_svg(snap)}

