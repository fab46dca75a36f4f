"""Fit and efficiency advisor: which variant a box can serve, what it costs in memory, how much sits idle.

A pure library (no Django): the `fit` management command and the registry's tasks call these functions.
Names load on first use, so the torch-free parts (datasheets, bounds) can be imported by the worker's
import checks without pulling in torch and transformers.
"""

from importlib import import_module

_EXPORTS = {
    "accounting": ("Accounting", "account", "build_meta_model"),
    "activation": ("forward_peak", "meta_forward_peak"),
    "advice": ("advise", "parse_request"),
    "charts": ("render_expert_chart", "render_memory_chart", "render_throughput_chart"),
    "experts": ("experts_hit", "idle_fraction", "tokens_per_working_expert"),
    "hardware": ("ACCELERATORS", "HardwareSpec", "HardwareSpecError", "inventory", "parse_hardware"),
    "measure": ("count_parameters", "measure_expert_hits", "measure_kv_bytes_per_token", "measure_weights"),
    "recommend": ("Recommendation", "recommend"),
    "report": ("FitReport", "analyze", "format_text"),
    "source": ("KNOWN_CONFIGS", "ConfigError", "load_source"),
    "workload": ("Workload", "WorkloadError", "parse_workload"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    """Import the submodule that defines `name` on first use (PEP 562)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
