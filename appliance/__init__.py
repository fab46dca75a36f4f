# The offline variables must be in place before anything imports huggingface_hub
# or transformers; every appliance process imports this package first.
from audit.egress import set_offline_environment

set_offline_environment()

from .celery import app as celery_app  # noqa: E402

__all__ = ["celery_app"]
