"""Read a model's architecture from a directory, a config.json file or a shipped well-known name."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PreTrainedConfig

from .bounds import check_buildable, check_model_dir

CONFIG_DIR = Path(__file__).with_name("configs")
# Names a planner may type instead of a path; the files and their sources are listed in configs/README.md.
KNOWN_CONFIGS = {
    "deepseek-v3": "deepseek-v3.json",
    # R1 is V3 post-trained: its config.json has the same fields and shapes.
    "deepseek-r1": "deepseek-v3.json",
    # The distilled alternatives: dense models a single GPU or a few hold.
    "deepseek-r1-distill-qwen-32b": "deepseek-r1-distill-qwen-32b.json",
    "deepseek-r1-distill-llama-70b": "deepseek-r1-distill-llama-70b.json",
}
# For each large MoE family, the distilled dense models its publisher offers in its place, and the size from
# which a model of that family is the large one (a demo model of the same architecture is not).
DISTILLED = {
    "deepseek_v3": ("deepseek-r1-distill-qwen-32b", "deepseek-r1-distill-llama-70b"),
}
FULL_SIZE_PARAMS = {"deepseek_v3": 600e9}


def is_full_size(model_type: str, total_params: int) -> bool:
    """Return whether a model is the published large member of its family (what published figures measured)."""
    return total_params >= FULL_SIZE_PARAMS.get(model_type, float("inf"))
# Keys that describe how to fetch or run code, never the architecture; dropped before building.
_IGNORED_KEYS = ("auto_map", "quantization_config", "_name_or_path")


class ConfigError(ValueError):
    """A model source that cannot be read as a transformers architecture."""


@dataclass(frozen=True)
class ModelSource:
    """One model architecture as read from disk: the config, its raw JSON and where it came from."""

    name: str
    origin: str
    raw: dict
    config: PreTrainedConfig

    @property
    def quantization(self) -> dict | None:
        """Return the checkpoint's quantization_config, if it declares one."""
        return self.raw.get("quantization_config")

    @property
    def stored_dtype(self) -> str:
        """Return the dtype the checkpoint's unquantized tensors are stored in."""
        return str(self.raw.get("torch_dtype") or self.raw.get("dtype") or "float32").replace("torch.", "")


def load_source(spec: str | Path) -> ModelSource:
    """Return the architecture named by a directory, a config.json path or a well-known name."""
    text = str(spec)
    if text.lower() in KNOWN_CONFIGS:
        path = CONFIG_DIR / KNOWN_CONFIGS[text.lower()]
        name = text.lower()
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        name = path.parent.name if path.name == "config.json" else path.stem
        if not path.is_file():
            known = ", ".join(sorted(KNOWN_CONFIGS))
            raise ConfigError(f"no config.json at {spec!s}; give a model directory, a config file or one of: {known}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a JSON object")
    if any(path.parent.glob("*.safetensors")):
        # A model directory: its weight files' sizes bound the config before anything is built.
        check_model_dir(path.parent, raw)
    return ModelSource(name=name, origin=str(path), raw=raw, config=config_from_dict(raw))


def config_from_dict(raw: dict) -> PreTrainedConfig:
    """Build the native transformers config for a raw config.json dict, never running remote code."""
    check_buildable(raw)  # arithmetic first: a config of millions of layers is refused, not built
    fields = {k: v for k, v in raw.items() if k not in _IGNORED_KEYS}
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ConfigError("config.json has no model_type")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"transformers cannot build model_type {model_type!r}: {exc}") from exc
