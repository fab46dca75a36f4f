"""The chat API's Django handler: URL routing, the view, security headers; none of the console's middleware.

Sessions, CSRF, sign-in and the password-change redirect are for people in a browser; the API authenticates
every request by its key on the gatekeeper thread. Skipping them spares each chat request the thread hops
that Django's sync-only middleware costs, and those hops compete with the engine for the web process's one
interpreter lock. Django's SecurityMiddleware still applies (HTTPS redirect and HSTS in production, nosniff):
it only reads the request and sets headers, so it runs inline on the event loop.

Before Django sees a request, the handler decides whether its body is read at all: a request with a body
and without a known key gets none (its view answers 401), a Content-Length over the limit is a 413 before a
byte is read, and a body that grows past the limit or arrives too slowly is cut (413, 408). Each such refusal
closes the connection, so the rest of the body is never taken.
"""
import logging
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import ThreadSensitiveContext
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.middleware.security import SecurityMiddleware

from . import peer, views
from .errors import error

from .. import http_limits

log = logging.getLogger(__name__)
API_PREFIX = "/v1/"
# The thread that runs the API's little sync work (Django's request signals, closing the response). Django's
# handler gives every request a thread context of its own, which starts and stops a thread per request.
_sync_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="api-sync")
REFUSAL_CODES = {400: "invalid_content_length", 408: "request_timeout", 413: "request_too_large"}


class ApiHandler(ASGIHandler):
    """Django's ASGI handler whose middleware is SecurityMiddleware alone, called without a thread hop."""

    async def __call__(self, scope, receive, send):
        """Handle one HTTP request (appliance.asgi routes only those here), its sync parts on one kept thread."""
        async with ThreadSensitiveContext(executor=_sync_thread):
            try:
                # A call from another node carries no key but a signature, which its view checks over the body.
                token = views.bearer_token(http_limits.header(scope, b"authorization"))
                known = (not http_limits.has_body(scope) or peer.claims_a_signature(scope)
                         or await views.key_may_send_body(token))
            except Exception:  # the gatekeeper could not answer (a database outage): a 5xx, counted like any
                log.exception("checking the key of %s %s failed", scope["method"], scope["path"])
                await self.send_response(views.server_error(scope["path"], "key check"), http_limits.closing(send))
                return
            if not known:
                # Not a byte of the body is read: the view answers 401 from the flag alone.
                await self.handle({**scope, views.KEY_REFUSED: True}, http_limits.replay(b"", receive),
                                  http_limits.closing(send))
                return
            try:
                body = await http_limits.take_body(scope, receive)
            except http_limits.BodyRefused as refused:
                await self.send_response(error(refused.message, refused.status, code=REFUSAL_CODES[refused.status]),
                                         http_limits.closing(send))
                return
            except http_limits.ClientLeft:
                return
            await self.handle(scope, http_limits.replay(body, receive), send)

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
