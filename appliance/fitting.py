"""The fit advisor in the registry: predictions made by the worker, measurements made by the web process.

Predictions come from config.json alone (inference.fit builds the model on the
meta device); measurements come from the engine that really holds the weights.
Both are stored so the console shows them side by side.
"""
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from django.conf import settings

from inference.fit.datasheets import Accelerator
from inference.fit.experts import experts_hit

from . import actions
from .modelfiles import InvalidModelDir, in_store
from .models import FitAnalysis, ModelVariant
from .weightcheck import check_model_dir

log = logging.getLogger(__name__)
ACTOR = "system:worker"
POLL_S = 0.5  # how often a running analysis checks that its variant still exists
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def charts_dir(variant: ModelVariant) -> Path:
    """Return the folder of a variant's fit charts, checked to stay inside APPLIANCE_HOME/fit (a row written before
    names were validated could hold '../x')."""
    return in_store(Path(settings.APPLIANCE_HOME) / "fit", variant.name)


def run_fit(variant_id: int) -> None:
    """Analyse a stored variant for this box (or the planning spec in settings) and store the report.

    The analysis builds the model on the meta device, which for a config that lies can take minutes and
    gigabytes; so the config is first bounded against the weights (arithmetic on the headers), and the
    analysis runs in a child process that is killed when its time is up or its variant is deleted.
    """
    variant = ModelVariant.objects.filter(pk=variant_id).first()
    if variant is None or not variant.store_path:
        return
    started = time.monotonic()
    store = Path(variant.store_path)
    try:
        check_model_dir(store)
    except InvalidModelDir as exc:
        _record(variant, started, outcome="refused", reason=str(exc))
        return
    with tempfile.TemporaryDirectory(prefix="fit-") as tmp:
        out = Path(tmp)
        cmd = [sys.executable, "-m", "django", "fit", str(store), "--json", "--charts", str(out / "charts"),
               "--context", str(settings.FIT_CONTEXT)]
        if settings.FIT_HARDWARE:
            cmd += ["--hardware", settings.FIT_HARDWARE]

        def gone() -> bool:
            return not ModelVariant.objects.filter(pk=variant_id, store_path=variant.store_path).exists()

        result = supervise(cmd, out, timeout_s=settings.FIT_TIMEOUT_S, cancelled=gone)
        if result != "done":
            reason = (f"stopped after {settings.FIT_TIMEOUT_S} s (APPLIANCE_FIT_TIMEOUT_S)" if result == "timeout"
                      else "stopped: the variant was deleted or re-imported")
            _record(variant, started, outcome="failed" if result == "timeout" else "cancelled", reason=reason)
            return
        stdout = (out / "stdout").read_text()
        if not stdout.lstrip().startswith("{"):
            _record(variant, started, outcome="failed", reason=(out / "stderr").read_text()[-500:].strip())
            return
        summary = json.loads(stdout)
        charts = {kind: next((out / "charts").glob(f"*-{kind}.svg"), None) for kind in ("memory", "experts")}
        _store(variant, summary, charts, started)


def supervise(cmd: list[str], out: Path, *, timeout_s: float, cancelled) -> str:
    """Run cmd with its output in out/stdout and out/stderr; return done, timeout or cancelled (then killed)."""
    deadline = time.monotonic() + timeout_s
    with (out / "stdout").open("wb") as stdout, (out / "stderr").open("wb") as stderr:
        # Its own session, so the kill reaches anything it started too.
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, cwd=settings.BASE_DIR, start_new_session=True,
                                env={**os.environ, "DJANGO_SETTINGS_MODULE": "appliance.settings"})
        try:
            while True:
                try:
                    proc.wait(timeout=min(POLL_S, max(0.01, deadline - time.monotonic())))
                    return "done"
                except subprocess.TimeoutExpired:
                    pass
                if cancelled():
                    return "cancelled"
                if time.monotonic() >= deadline:
                    return "timeout"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _store(variant: ModelVariant, summary: dict, charts: dict, started: float) -> None:
    """Save an analysis's charts, then its report with its ledger event."""
    target = charts_dir(variant)
    target.mkdir(parents=True, exist_ok=True)
    for kind, chart in charts.items():
        if chart is not None:
            (target / f"{kind}.svg").write_text(chart.read_text())
    actions.do_record_fit(variant, summary, duration_ms=elapsed_ms(started), actor=ACTOR)


def _record(variant: ModelVariant, started: float, *, outcome: str, reason: str) -> None:
    """Record an analysis that was refused, failed or stopped (no report is stored)."""
    log.warning("fit analysis of %s %s: %s", variant.name, outcome, reason)
    actions.do_record_fit_failure(variant, outcome=outcome, reason=reason, duration_ms=elapsed_ms(started),
                                  actor=ACTOR)


def elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def record_measurement(deployment_id: int, measured: dict) -> None:
    """Record what the loaded engine really allocated (measured in its process), next to the advisor's prediction."""
    if "error" in measured:  # the engine could not measure itself; it serves anyway
        log.warning("deployment %d has no measurement: %s", deployment_id, measured["error"])
        return
    actions.do_record_measurement(deployment_id, measured)


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
    from inference.fit import recommend  # here: it pulls in torch, which the worker never needs

    reports = [
        SimpleNamespace(name=f.variant.name, verdict=f.report["verdict"], decode=f.report["decode"], context=context,
                        accounting=SimpleNamespace(total=f.report["parameters"]["total"]))
        for f in FitAnalysis.objects.select_related("variant")
    ]
    return recommend(reports, users) if reports else None


def live_telemetry(variant: ModelVariant) -> dict | None:
    """Return the loaded engine's router telemetry with the uniform-routing prediction beside it."""
    from appliance import engine_client  # here: it pulls in torch, which the worker never needs

    engine = engine_client.get(variant.name)
    if engine is None:
        return None
    snap = engine.telemetry()
    if not snap.get("moe"):
        return None
    experts, k = snap["num_experts"], snap["experts_per_token"]
    by_tokens: dict[int, list[float]] = {}
    for step in snap["recent"]:
        if step["idle_fraction"] is not None:
            by_tokens.setdefault(step["tokens"], []).append(experts * (1 - step["idle_fraction"]))
    hits = [{"tokens": tokens, "measured": sum(v) / len(v), "predicted": experts_hit(experts, k, tokens),
             "calls": len(v)} for tokens, v in sorted(by_tokens.items())]
    return {"snapshot": snap, "expert_hits": hits}



def stored_hardware(report: dict):
    """Return the HardwareSpec a stored report was analysed for (this box's inventory included)."""
    from inference.fit.hardware import HardwareSpec  # here: it pulls in torch, which the worker never needs

    hw = report["hardware"]
    accel = hw.get("accelerator")
    return HardwareSpec(label=hw["label"], accelerator=Accelerator(**accel) if accel else None, count=hw["count"],
                        boxes=hw.get("boxes", 1), host_ram_gb=hw.get("host_ram_gb"),
                        host_bandwidth_tbs=hw.get("host_bandwidth_tbs"), host_bf16_tflops=hw.get("host_bf16_tflops"))


def throughput_advice(variant: ModelVariant, params) -> dict:
    """Return the fit page's throughput section for the workload the admin entered (GET parameters).

    Every figure comes from the stored report's profiles; the form's values are checked by the advisor's own
    parsers, and what they refuse is shown as the error, never a 500.
    """
    # Here: both pull in torch and transformers, which the worker (it imports this module) never needs.
    from inference.fit import advice
    from inference.fit.hardware import HardwareSpecError, parse_hardware

    fit = getattr(variant, "fit", None)
    form = {"in": params.get("in", "1000"), "out": params.get("out", "1000"), "concurrency": params.get("concurrency", "16"),
            "engine": params.get("engine", ""), "plan": params.get("plan", ""), "hardware": params.get("hardware", "")}
    out = {"form": form}
    if fit is None or "in" not in params:
        return out
    if not fit.report.get("profiles"):
        return {**out, "error": "this analysis predates throughput profiles; use “Analyse fit” to run it again"}
    try:
        spec = f"in={form['in']},out={form['out']},concurrency={form['concurrency']}"
        request = advice.parse_request(spec, form["engine"] or None, form["plan"] or None)
        hw = parse_hardware(form["hardware"]) if form["hardware"].strip() else stored_hardware(fit.report)
        result = advice.advise(fit.report, request, hw)
        chart = base64.b64encode(advice.throughput_chart(fit.report, request, hw).encode()).decode()
    except (HardwareSpecError, ValueError) as exc:
        return {**out, "error": str(exc)}
    return {**out, **result, "chart": chart}
