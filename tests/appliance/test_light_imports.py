"""What the web process, the worker and every management command load: neither torch nor transformers.

Importing them costs about two seconds of CPU each time (a management command took 3.9 s instead of 0.9 s when
Django's URL checks pulled torch in through the engine's config). Only the engine process, the fit analysis, a
GGUF conversion and a box with a GPU driver need them.
"""
import os
import subprocess
import sys
from pathlib import Path

from appliance import gpus

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers")

# Django set up, its system checks run (they import every URL module: the chat API, the console, /metrics), the
# Celery app's tasks and the ASGI application's modules imported; then the heavy modules that got loaded.
PROBE = """
import sys
import django
django.setup()
from django.core import checks
assert not checks.run_checks(), checks.run_checks()
import appliance.tasks, appliance.console.dashboard, appliance.api.completions, appliance.api.responses
import appliance.engines, appliance.fp8, appliance.nodes, appliance.reconciler
print(sorted(m for m in {heavy!r} if m in sys.modules))
"""


def loaded_by(code: str, tmp_path: Path) -> str:
    env = {**os.environ, "APPLIANCE_HOME": str(tmp_path / "home"), "DJANGO_SETTINGS_MODULE": "appliance.settings"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_the_web_and_worker_modules_load_neither_torch_nor_transformers(tmp_path):
    assert loaded_by(PROBE.format(heavy=HEAVY), tmp_path) == "[]"


def test_the_probe_sees_torch_when_a_module_loads_it(tmp_path):
    # The same probe, with one module that does load torch: the check above can fail.
    assert loaded_by(PROBE.format(heavy=HEAVY) + "import inference.engine.precision\n"
                     f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n", tmp_path) == "['torch']"


def test_without_a_gpu_driver_there_is_no_gpu_and_torch_is_not_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(gpus, "DRIVER_DEVICES", (str(tmp_path / "nvidia[0-9]*"),))
    assert not gpus.driver_present()
    assert gpus.torch_cuda() is None


def test_with_a_driver_device_torch_is_asked(tmp_path, monkeypatch):
    (tmp_path / "nvidia0").touch()
    monkeypatch.setattr(gpus, "DRIVER_DEVICES", (str(tmp_path / "nvidia[0-9]*"),))
    assert gpus.driver_present()
    import torch

    # This box has no GPU (a device file alone does not make one): torch's answer is what counts.
    assert gpus.torch_cuda() is (torch.cuda if torch.cuda.is_available() else None)
