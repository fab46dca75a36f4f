"""Keep the process from talking to the outside world.

For now this sets the offline and telemetry-off variables of the Hugging Face
libraries; it must run before those libraries are imported, because they read
the variables once at import time.
"""
import os

OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def set_offline_environment() -> None:
    """Force the offline variables, overriding anything inherited from the shell."""
    os.environ.update(OFFLINE_ENVIRONMENT)
