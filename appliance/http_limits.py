"""Limits on what a client may make the web process hold: body size, and time to send headers and body.

uvicorn closes a keep-alive connection that stays idle between requests (--timeout-keep-alive), but a client
that drips its headers or its body a byte at a time would hold a connection (and, for the body, a request)
for as long as it likes. The header deadline lives in the HTTP protocol (HeaderTimeoutProtocol, passed to
uvicorn with --http); the body deadline and the size limit where the application reads the body.
"""
import asyncio

from django.conf import settings
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# uvicorn's --timeout-keep-alive for the web process: an idle connection is closed after this many seconds (the
# clients of other nodes keep theirs for less, engine_client.CLIENT_KEEPALIVE_S).
SERVER_KEEPALIVE_S = 5


class BodyRefused(Exception):
    """The body was not taken: too large (413) or too slow (408); `status` and `message` say which."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ClientLeft(Exception):
    """The client disconnected before its body was complete."""


def header(scope, name: bytes) -> str:
    """Return the first value of a request header from an ASGI scope, or ""."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


def has_body(scope) -> bool:
    """Return whether the request announces a body (a non-zero Content-Length, or chunked)."""
    return header(scope, b"content-length") not in ("", "0") or bool(header(scope, b"transfer-encoding"))


def too_large(limit: int) -> BodyRefused:
    return BodyRefused(413, f"Request body is larger than this box accepts ({limit:,} bytes; "
                            "APPLIANCE_MAX_BODY_BYTES).")


def check_length(scope, limit: int) -> None:
    """Raise BodyRefused for a Content-Length over limit (or not a number), before a byte of the body is read."""
    length = header(scope, b"content-length")
    if not length:
        return
    if not length.isdigit():
        raise BodyRefused(400, f"Content-Length {length[:40]!r} is not a number of bytes.")
    if int(length) > limit:
        raise too_large(limit)


async def read_body(receive, limit: int, timeout_s: float) -> bytes:
    """Return the whole body, counting bytes as they come (chunked bodies have no length to check up front).

    Raise BodyRefused past `limit` bytes or when the body is not complete within `timeout_s`, ClientLeft
    when the client disconnects first.
    """
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientLeft()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise BodyRefused(408, f"The request body did not arrive within {timeout_s:g} s "
                               "(APPLIANCE_BODY_TIMEOUT_S).") from None


async def take_body(scope, receive) -> bytes:
    """Return the request's body within the settings' size and time limits (BodyRefused, ClientLeft otherwise)."""
    check_length(scope, settings.API_MAX_BODY_BYTES)
    return await read_body(receive, settings.API_MAX_BODY_BYTES, settings.HTTP_BODY_TIMEOUT_S)


async def bounded(app, scope, receive, send) -> None:
    """Run an ASGI app on a request whose body was taken within the limits, or answer the refusal in plain text."""
    try:
        body = await take_body(scope, receive)
    except BodyRefused as refused:
        await closing(send)({"type": "http.response.start", "status": refused.status,
                             "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "http.response.body", "body": f"{refused.message}\n".encode()})
        return
    except ClientLeft:
        return
    await app(scope, replay(body, receive), send)


def replay(body: bytes, receive):
    """Return an ASGI receive that hands over `body` in one message, then the connection's own messages.

    Body messages a client goes on sending after that (one whose body was left unread) are dropped: Django's
    handler takes anything but a disconnect after the body for a protocol error.
    """
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        if pending:
            return pending.pop()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message

    return replayed


def closing(send):
    """Return an ASGI send that asks the server to close the connection after this response."""

    async def send_and_close(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await send(message)

    return send_and_close


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's headers (settings.HTTP_HEADER_TIMEOUT_S).

    The clock starts when the connection opens or a new request's first byte arrives, and stops when its
    headers are complete; a connection still sending headers then is closed.
    """

    header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self.header_deadline is None:
            self.header_deadline = self.loop.call_later(settings.HTTP_HEADER_TIMEOUT_S, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _headers_too_slow(self) -> None:
        self.header_deadline = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers took over %s s",
                             settings.HTTP_HEADER_TIMEOUT_S)
            self.transport.close()
