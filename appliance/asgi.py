"""ASGI entry point of the web process: console, chat API and the engine.

The chat API (/v1/) is served by Django without the console's middleware. Sessions, CSRF, sign-in and the
password-change redirect are for people in a browser; the API authenticates every request by its key on the
gatekeeper thread. Skipping them spares each chat request the thread hops that Django's sync-only middleware
costs, and those hops compete with the engine for this process's one interpreter lock.
"""
import os

import appliance  # noqa: F401  (sets the offline environment first)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

console_application = get_asgi_application()

from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.core.handlers.exception import convert_exception_to_response  # noqa: E402

API_PREFIX = "/v1/"


class ApiHandler(ASGIHandler):
    """Django's ASGI handler with no middleware: URL routing, the view, and errors as responses."""

    def load_middleware(self, is_async=False):
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        self._middleware_chain = convert_exception_to_response(
            self._get_response_async if is_async else self._get_response)


api_application = ApiHandler()


async def application(scope, receive, send):
    """Send chat API requests to the lean handler and everything else (console, /metrics) to Django's."""
    lean = scope["type"] == "http" and scope["path"].startswith(API_PREFIX)
    await (api_application if lean else console_application)(scope, receive, send)


from appliance import reconciler  # noqa: E402

reconciler.start()
