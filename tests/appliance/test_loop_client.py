"""The HTTP client to engines' and nodes' servers keeps an idle connection for less than those servers do.

With both at 5 s, a request sent on a connection the server was closing that instant failed with a ReadError: a
forwarded request came back 503 "node-2 ... cannot be reached" in CI, 5 s after node-1 last used its connection.
Here a keep-alive HTTP/1.1 server on loopback reports which client port each request came from.
"""
import asyncio
import weakref

from appliance.engine_client import CLIENT_KEEPALIVE_S, loop_client
from appliance.http_limits import SERVER_KEEPALIVE_S

VLLM_KEEPALIVE_S = 5  # vLLM's own server (VLLM_HTTP_TIMEOUT_KEEP_ALIVE's default), which the same client calls


async def ports_of_two_requests(pause_s: float) -> tuple[int, int]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = writer.get_extra_info("peername")[1]
        while await reader.readuntil(b"\r\n\r\n"):  # keep-alive: every request on this connection, until closed
            body = str(port).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    async def serve(reader, writer):
        try:
            await answer(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    clients = weakref.WeakKeyDictionary()
    try:
        client = loop_client(clients, timeout=10)
        first = int((await client.get(url)).text)
        await asyncio.sleep(pause_s)
        second = int((await client.get(url)).text)
        await client.aclose()
    finally:
        server.close()
    return first, second


def test_an_idle_connection_is_dropped_before_the_servers_close_theirs():
    assert CLIENT_KEEPALIVE_S < SERVER_KEEPALIVE_S and CLIENT_KEEPALIVE_S < VLLM_KEEPALIVE_S
    first, second = asyncio.run(ports_of_two_requests(CLIENT_KEEPALIVE_S + 0.5))
    assert first != second  # a new connection: the idle one was not reused


def test_a_connection_used_again_soon_is_reused():
    first, second = asyncio.run(ports_of_two_requests(0.1))
    assert first == second
