# The egress guard and the offline variables must be in place before anything imports
# huggingface_hub, transformers or a network client; every appliance process imports this
# package first (manage.py, celery -A appliance, appliance.asgi).
from audit.egress import install_guard, set_offline_environment

set_offline_environment()
install_guard()

from .celery import app as celery_app  # noqa: E402

__all__ = ["celery_app"]
