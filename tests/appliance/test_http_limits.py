"""The web process's body limits, on the ASGI messages themselves: counted as they come, cut in time."""
import asyncio

import pytest

from appliance import http_limits


def scope_with(**headers: str) -> dict:
    return {"type": "http", "headers": [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]}


def messages(*chunks: bytes):
    """Return an ASGI receive that hands out chunks as one body, then waits like a connected client."""
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.Event().wait()

    return receive


def test_a_content_length_over_the_limit_is_refused_before_reading():
    with pytest.raises(http_limits.BodyRefused) as refused:
        http_limits.check_length(scope_with(Content_Length="52428800"), 1024)
    assert refused.value.status == 413 and "1,024 bytes" in refused.value.message


@pytest.mark.parametrize("length", ["-1", "12abc", "1e9"])
def test_a_content_length_that_is_not_a_number_is_a_400(length):
    with pytest.raises(http_limits.BodyRefused) as refused:
        http_limits.check_length(scope_with(Content_Length=length), 1024)
    assert refused.value.status == 400


def test_a_body_is_counted_as_it_arrives_and_cut_past_the_limit():
    assert asyncio.run(http_limits.read_body(messages(b"a" * 600, b"b" * 424), 1024, 5)) == b"a" * 600 + b"b" * 424
    with pytest.raises(http_limits.BodyRefused) as refused:
        asyncio.run(http_limits.read_body(messages(b"a" * 600, b"b" * 425), 1024, 5))
    assert refused.value.status == 413


def test_a_body_that_does_not_complete_in_time_is_a_408():
    async def dripping():
        await asyncio.sleep(0.01)
        return {"type": "http.request", "body": b"x", "more_body": True}

    with pytest.raises(http_limits.BodyRefused) as refused:
        asyncio.run(http_limits.read_body(dripping, 1024, 0.2))
    assert refused.value.status == 408 and "0.2 s" in refused.value.message


def test_a_client_that_leaves_mid_body_is_noticed():
    async def leaving():
        return {"type": "http.disconnect"}

    with pytest.raises(http_limits.ClientLeft):
        asyncio.run(http_limits.read_body(leaving, 1024, 5))


def test_a_replayed_body_comes_whole_and_later_body_messages_are_dropped():
    async def go():
        receive = http_limits.replay(b"whole", messages(b"late", b"later"))
        first = await receive()
        try:
            await asyncio.wait_for(receive(), 0.2)  # the late body messages are swallowed; nothing else comes
        except TimeoutError:
            return first, None
        return first, "something"

    first, after = asyncio.run(go())
    assert first == {"type": "http.request", "body": b"whole", "more_body": False}
    assert after is None
