"""Settings from the environment: unreadable values stop the process naming the variable; the engine settings reach the engines the reconciler loads."""
import os
import subprocess
import sys

import pytest

from appliance.reconciler import engine_config
from inference.engine import Engine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def settings_value(name: str, **env: str) -> subprocess.CompletedProcess:
    """Import the settings in a fresh interpreter with `env` and print one of them."""
    code = f"from appliance import settings; print(repr(settings.{name}))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("value, expected", [("on", "True"), ("OFF", "False")])
def test_engine_exact_is_read_from_the_environment(value: str, expected: str) -> None:
    result = settings_value("ENGINE_EXACT", APPLIANCE_ENGINE_EXACT=value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_a_bad_engine_exact_names_the_variable() -> None:
    result = settings_value("ENGINE_EXACT", APPLIANCE_ENGINE_EXACT="maybe")
    assert result.returncode != 0
    assert "APPLIANCE_ENGINE_EXACT must be on or off, not 'maybe'" in result.stderr


def test_the_reconciler_builds_engines_with_the_configured_exactness(settings, demo_dir) -> None:
    settings.ENGINE_DEVICE, settings.ENGINE_EXACT = "cpu", False
    config = engine_config()
    assert config.exact is False
    with Engine(demo_dir / "demo-distilled", config) as engine:
        assert engine.exact is False
    settings.ENGINE_EXACT = True
    with Engine(demo_dir / "demo-distilled", engine_config()) as engine:
        assert engine.exact is True


def test_plain_batched_products_are_the_default_on_every_device(demo_dir) -> None:
    result = settings_value("ENGINE_EXACT")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    with Engine(demo_dir / "demo-dense", device="cpu") as engine:
        assert engine.exact is False


@pytest.mark.parametrize("variable, value, message", [
    ("APPLIANCE_PRODUCTION", "ture", "APPLIANCE_PRODUCTION must be one of"),
    ("APPLIANCE_QUEUE_LIMIT", "64k", "APPLIANCE_QUEUE_LIMIT must be a whole number, not '64k'"),
    ("APPLIANCE_RECONCILE_INTERVAL", "fast", "APPLIANCE_RECONCILE_INTERVAL must be a number, not 'fast'"),
    ("APPLIANCE_ENGINE_HUNG_AFTER_S", "1m", "APPLIANCE_ENGINE_HUNG_AFTER_S must be a number, not '1m'"),
    ("APPLIANCE_ENGINE_HUNG_AFTER_S", "0", "APPLIANCE_ENGINE_HUNG_AFTER_S must be a number of seconds above 0"),
])
def test_an_unreadable_setting_stops_the_process_naming_the_variable(variable, value, message) -> None:
    result = settings_value("DEBUG", **{variable: value})
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize("value, expected", [("off", "False"), ("YES", "True"), ("", "False")])
def test_yes_no_settings_read_their_words(value, expected) -> None:
    result = settings_value("APPLIANCE_PRODUCTION", APPLIANCE_PRODUCTION=value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_the_reconciler_passes_the_configured_weight_precision(settings) -> None:
    settings.ENGINE_PRECISION = "bfloat16"
    assert engine_config().precision == "bfloat16"
    settings.ENGINE_PRECISION = "auto"
    assert engine_config().precision == "auto"
