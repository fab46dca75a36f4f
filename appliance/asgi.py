"""ASGI entry point of the web process: console, chat API and the engine.

The chat API (/v1/) is served by a lean Django handler (see appliance.api_handler); everything else by
Django's own, with the console's middleware.
"""
import os

import appliance  # noqa: F401  (sets the offline environment first)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

console_application = get_asgi_application()

from appliance.api_handler import API_PREFIX, ApiHandler  # noqa: E402

api_application = ApiHandler()


async def application(scope, receive, send):
    """Send chat API requests to the lean handler and everything else (console, /metrics) to Django's."""
    lean = scope["type"] == "http" and scope["path"].startswith(API_PREFIX)
    await (api_application if lean else console_application)(scope, receive, send)


from appliance import reconciler  # noqa: E402

reconciler.start()
