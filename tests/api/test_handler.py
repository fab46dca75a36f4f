"""The chat API's lean handler: no console middleware, but Django's security checks and headers still apply."""
import asyncio
import threading

import pytest

from appliance.api.handler import ApiHandler
from tests.audit.tamper import wipe_ledger


def call(path: str, scheme: str = "http") -> tuple[int, dict, bytes]:
    """Send one GET through a fresh ApiHandler over ASGI; return status, headers and body."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": scheme,
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    sent = []

    async def go():
        request = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive():
            if request:
                return request.pop()
            await asyncio.Event().wait()  # the client stays connected; the handler cancels this wait

        async def send(message):
            sent.append(message)

        await ApiHandler()(scope, receive, send)

    asyncio.run(go())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, body


@pytest.fixture
def committed(transactional_db):
    yield
    wipe_ledger()  # the refused request is a ledger event; the ledger's triggers refuse the test's flush


def test_api_answers_without_console_middleware_but_with_security_headers(committed):
    status, headers, body = call("/v1/models")
    assert status == 401 and b"invalid_api_key" in body
    assert headers["x-content-type-options"] == "nosniff"  # SecurityMiddleware ran
    assert "x-frame-options" not in headers and "set-cookie" not in headers  # the console's did not


def test_production_https_redirect_covers_the_api(committed, settings):
    settings.SECURE_SSL_REDIRECT = True
    status, headers, _ = call("/v1/models")
    assert status == 301 and headers["location"] == "https://127.0.0.1/v1/models"
    settings.SECURE_HSTS_SECONDS = 3600
    status, headers, _ = call("/v1/models", scheme="https")
    assert headers["strict-transport-security"].startswith("max-age=3600")


def test_the_api_runs_its_sync_work_on_one_kept_thread(committed):
    # Django's own handler would start (and stop) a thread for each request's signals.
    from django.core.signals import request_started

    threads = []

    def where(**kwargs):
        threads.append(threading.current_thread().name)

    request_started.connect(where)
    try:
        for _ in range(3):
            assert call("/v1/models")[0] == 401
    finally:
        request_started.disconnect(where)
    assert threads == ["api-sync_0"] * 3
