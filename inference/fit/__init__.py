"""Fit and efficiency advisor: which variant a box can serve, what it costs in memory, how much sits idle.

A pure library (no Django): the `fit` management command and the registry's tasks call these functions.
"""

from .accounting import Accounting, account, build_meta_model
from .activation import forward_peak, meta_forward_peak
from .charts import render_expert_chart, render_memory_chart
from .experts import experts_hit, idle_fraction, tokens_per_working_expert
from .hardware import ACCELERATORS, HardwareSpec, HardwareSpecError, inventory, parse_hardware
from .measure import count_parameters, measure_expert_hits, measure_kv_bytes_per_token, measure_weights
from .recommend import Recommendation, recommend
from .report import FitReport, analyze, format_text
from .source import KNOWN_CONFIGS, ConfigError, load_source

__all__ = [
    "ACCELERATORS", "Accounting", "ConfigError", "FitReport", "HardwareSpec", "HardwareSpecError", "KNOWN_CONFIGS",
    "Recommendation", "account", "analyze", "build_meta_model", "count_parameters", "experts_hit", "format_text",
    "forward_peak", "idle_fraction", "inventory", "load_source", "measure_expert_hits", "measure_kv_bytes_per_token",
    "measure_weights", "meta_forward_peak", "parse_hardware", "recommend", "render_expert_chart",
    "render_memory_chart", "tokens_per_working_expert",
]
