"""The chat API's Django handler: URL routing, the view, security headers; none of the console's middleware.

Sessions, CSRF, sign-in and the password-change redirect are for people in a browser; the API authenticates
every request by its key on the gatekeeper thread. Skipping them spares each chat request the thread hops
that Django's sync-only middleware costs, and those hops compete with the engine for the web process's one
interpreter lock. Django's SecurityMiddleware still applies (HTTPS redirect and HSTS in production, nosniff):
it only reads the request and sets headers, so it runs inline on the event loop.
"""
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import ThreadSensitiveContext
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.middleware.security import SecurityMiddleware

API_PREFIX = "/v1/"
# The thread that runs the API's little sync work (Django's request signals, closing the response). Django's
# handler gives every request a thread context of its own, which starts and stops a thread per request.
_sync_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="api-sync")


class ApiHandler(ASGIHandler):
    """Django's ASGI handler whose middleware is SecurityMiddleware alone, called without a thread hop."""

    async def __call__(self, scope, receive, send):
        """Handle one HTTP request (appliance.asgi routes only those here), its sync parts on one kept thread."""
        async with ThreadSensitiveContext(executor=_sync_thread):
            await self.handle(scope, receive, send)

    def load_middleware(self, is_async=False):
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        view = convert_exception_to_response(self._get_response_async)
        security = SecurityMiddleware(view)

        async def secured(request):
            response = security.process_request(request) or await view(request)
            return security.process_response(request, response)

        self._middleware_chain = convert_exception_to_response(secured)
