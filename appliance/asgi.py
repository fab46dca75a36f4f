"""ASGI entry point of the web process: console, chat API and the engine.

The chat API (/v1/) is served by a lean Django handler (see appliance.api.handler); everything else by
Django's own, with the console's middleware.
"""
import os

import appliance  # noqa: F401  (sets the offline environment first)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

console_application = get_asgi_application()

from appliance import http_limits  # noqa: E402
from appliance.api.handler import API_PREFIX, ApiHandler  # noqa: E402
from appliance.api.peer import PREFIX as PEER_PREFIX  # noqa: E402

api_application = ApiHandler()


async def application(scope, receive, send):
    """Send chat API requests and other nodes' calls to the lean handler, everything else (console, /metrics) to
    Django's."""
    if scope["type"] != "http":
        await console_application(scope, receive, send)
    elif scope["path"].startswith((API_PREFIX, PEER_PREFIX)):
        await api_application(scope, receive, send)  # it applies the body limits itself, after the key check
    else:
        await http_limits.bounded(console_application, scope, receive, send)


from appliance import nodes, reconciler  # noqa: E402
from appliance.api import settlement  # noqa: E402

reconciler.start()
nodes.start()  # registers this node, then heartbeats
# Requests that an earlier web process of this host was serving when it died become chat.interrupted events.
settlement.recover_interrupted_soon()
