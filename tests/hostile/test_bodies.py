"""Hostile request bodies and slow clients against a live box: refused by name, cheaply, and the box keeps serving.

Raw sockets where the point is what the server does before a body is complete (an HTTP client library would
send the whole body first); the official openai client where the point is what a real client sees.
"""
import json
import random
import select
import socket
import time

import httpx
import pytest

from tests.livebox import start_box

# What a body or a slow client gets is decided before the database or broker is asked anything that differs
# between backends: CI runs this once, on embedded defaults.
pytestmark = pytest.mark.backend_neutral
MiB = 1024 * 1024
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def served(box):
    """Return (box, key) with a dense demo variant deployed as `bodies-dense`."""
    box.manage("import_model", str(box.demo_dir / "demo-dense"), "--name", "bodies-dense", "--kind", "dense", "--wait")
    box.manage("deploy", "bodies-dense", "--wait")
    return box, box.new_key("hostile-bodies")


def chat(**params) -> dict:
    return {"model": "bodies-dense", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, **params}


def address(box) -> tuple[str, int]:
    host, port = box.url.removeprefix("http://").split(":")
    return host, int(port)


def connect(box) -> socket.socket:
    return socket.create_connection(address(box), timeout=60)  # an upper bound on any one wait below


def head(path: str, key: str | None, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(conn: socket.socket) -> tuple[int, dict, bytes]:
    """Read one HTTP/1.1 response (Content-Length or chunked body); return status, headers and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += receive(conn)
    top, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    if headers.get("transfer-encoding") != "chunked":
        while len(rest) < int(headers.get("content-length", 0)):
            rest += receive(conn)
        return int(status_line.split()[1]), headers, rest
    body = b""
    while True:
        while b"\r\n" not in rest:
            rest += receive(conn)
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return int(status_line.split()[1]), headers, body
        while len(rest) < size + 2:
            rest += receive(conn)
        body, rest = body + rest[:size], rest[size + 2:]


def receive(conn: socket.socket) -> bytes:
    chunk = conn.recv(65536)
    if not chunk:
        raise AssertionError("the connection closed in the middle of a response")
    return chunk


def closed_by_server(conn: socket.socket) -> bool:
    """Return whether the server closed the connection (reading ends, or the peer reset it)."""
    try:
        while conn.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True


def alive(box) -> None:
    assert all(proc.poll() is None for proc in box.procs.values()), {n: p.poll() for n, p in box.procs.items()}


def assert_serving(box, key: str) -> None:
    """Assert that the box still answers a plain chat request, and that every process lives."""
    answer = httpx.post(box.url + CHAT, json=chat(), headers={"Authorization": f"Bearer {key}"}, timeout=120)
    assert answer.status_code == 200, answer.text
    alive(box)


def test_a_50_mb_body_is_a_413_before_it_is_read(served):
    box, key = served
    with connect(box) as conn:
        conn.sendall(head(CHAT, key, Content_Length=str(50 * MiB)) + b"[" * 65536)
        status, headers, body = read_response(conn)
        assert status == 413
        assert json.loads(body)["error"]["code"] == "request_too_large"
        assert "1,048,576 bytes" in json.loads(body)["error"]["message"]
        assert headers["connection"] == "close"
        assert closed_by_server(conn)  # the other 49.9 MB are never taken
    assert_serving(box, key)
    box.manage("audit_verify")


def test_a_client_that_asks_before_sending_is_told_413_without_a_100_continue(served):
    box, key = served
    with connect(box) as conn:
        conn.sendall(head(CHAT, key, Content_Length=str(50 * MiB), Expect="100-continue"))
        status, _, body = read_response(conn)  # curl's way with large bodies: nothing sent until told to
        assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    alive(box)


def test_the_console_refuses_a_50_mb_body_too(served):
    box, key = served
    with connect(box) as conn:
        conn.sendall(head("/admin/login/", None, Content_Length=str(50 * MiB)) + b"u" * 65536)
        status, _, body = read_response(conn)
        assert status == 413 and b"APPLIANCE_MAX_BODY_BYTES" in body
        assert closed_by_server(conn)
    assert_serving(box, key)


def test_a_chunked_body_is_cut_once_it_passes_the_limit(served):
    box, key = served
    sent = 0
    chunk = b"1" * 65536
    with connect(box) as conn:
        conn.sendall(head(CHAT, key, Transfer_Encoding="chunked"))
        conn.settimeout(0.05)
        answer = b""
        try:
            while sent < 50 * MiB and not answer:
                conn.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
                try:
                    answer = conn.recv(65536)
                except TimeoutError:
                    pass
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed it: what it answered first may be lost with the reset
        assert sent < 16 * MiB, "the server kept reading a chunked body far past the limit"
        if answer:
            assert answer.startswith(b"HTTP/1.1 413")
    assert_serving(box, key)


def test_a_strangers_2_mb_body_is_a_401_before_it_is_sent_and_others_are_served(served):
    box, key = served
    numbers = json.dumps({"model": "bodies-dense", "messages": [], "n": list(range(300_000))}).encode()
    assert len(numbers) > 2 * MiB
    with connect(box) as stranger:
        # Headers and the first 64 KiB only: the answer comes without the rest, so nothing was parsed.
        stranger.sendall(head(CHAT, "sk-box-not-a-key", Content_Length=str(len(numbers))) + numbers[:65536])
        meanwhile = httpx.post(box.url + CHAT, json=chat(), headers={"Authorization": f"Bearer {key}"}, timeout=120)
        status, headers, body = read_response(stranger)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        assert closed_by_server(stranger)
    assert meanwhile.status_code == 200
    with connect(box) as nobody:  # no key at all: the same
        nobody.sendall(head(CHAT, None, Content_Length=str(len(numbers))) + numbers[:65536])
        assert read_response(nobody)[0] == 401
    alive(box)
    box.manage("audit_verify")


def test_keyed_bodies_just_under_the_limit_are_served(served):
    box, key = served
    body = json.dumps({**chat(), "padding": list(range(120_000))}).encode()
    assert MiB // 2 < len(body) < MiB
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with httpx.Client(base_url=box.url, timeout=120) as client:
        answers = [client.post(CHAT, content=body, headers=auth) for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3
    assert_serving(box, key)


@pytest.mark.parametrize("depth", [40, 400_000])
def test_deep_nesting_is_a_400_naming_it(served, depth):
    box, key = served
    raw = b'{"model": "bodies-dense", "messages": [], "x": ' + b"[" * depth + b"]" * depth + b"}"
    answer = httpx.post(box.url + CHAT, content=raw, timeout=60,
                        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert answer.status_code == 400
    assert "deeper than 32 levels" in answer.json()["error"]["message"]
    alive(box)


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "a\\ud83d b"])
def test_text_the_tokenizer_cannot_take_is_a_400_naming_the_message(served, escape):
    box, key = served
    raw = ('{"model": "bodies-dense", "max_tokens": 2, "messages": [{"role": "user", "content": "fine"}, '
           f'{{"role": "user", "content": "{escape}"}}]}}').encode()
    answer = httpx.post(box.url + CHAT, content=raw, timeout=60,
                        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "messages.1.content"
    assert_serving(box, key)


@pytest.mark.parametrize("field,value", [("max_tokens", "1"), ("temperature", "0.5"), ("stream", "true"),
                                         ("seed", "7"), ("max_tokens", 1.5)])
def test_a_string_where_a_number_belongs_is_a_400_naming_the_field(served, field, value):
    box, key = served
    answer = httpx.post(box.url + CHAT, json=chat(**{field: value}), timeout=60,
                        headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == field
    alive(box)


# --- fuzzed bodies -----------------------------------------------------------------------------------------

FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n",
          "stream", "stream_options", "presence_penalty", "frequency_penalty", "top_k")


def random_json(rng: random.Random, depth: int = 0):
    """Return a random JSON value: any type, odd numbers and odd text included."""
    kinds = ["null", "bool", "int", "float", "str"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, 1, 2, 3, -1, 2**31, 2**63, 2**64 + 1, -(2**70), 10**30])
    if kind == "float":
        return rng.choice([0.0, 0.5, 1.0, 2.0, -0.0, 1e-300, 1e300, -2.5, 3.14])
    if kind == "str":
        return rng.choice(["", "x", "1", "true", "null", "bodies-dense", "\x00", "\u202e", "🙂" * 3, "a" * 300])
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["role", "content", "type", "text", "include_usage", "x"]): random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def fuzzed_body(rng: random.Random) -> dict:
    body = chat()
    for field in rng.sample(FIELDS, rng.randint(1, 4)):
        body[field] = random_json(rng)
    if rng.random() < 0.5:  # a valid message whose parts are fuzzed
        body["messages"] = [{"role": rng.choice(["user", "system", "tool", 5]), "content": random_json(rng)}]
    for field in ("max_tokens", "max_completion_tokens"):  # fuzz types, not the length of answers
        if type(body.get(field)) is int:
            body[field] = min(body[field], 8)
    return body


def test_fuzzed_bodies_never_get_a_5xx_nor_kill_a_process(served):
    box, key = served
    rng = random.Random(20261201)
    seen = set()
    with httpx.Client(base_url=box.url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
        for _ in range(80):
            body = fuzzed_body(rng)
            answer = client.post(CHAT, content=json.dumps(body, allow_nan=False).encode(),
                                 headers={"Content-Type": "application/json"})
            assert answer.status_code < 500, (body, answer.text)
            if answer.status_code == 400:
                assert answer.json()["error"]["message"], body
            if answer.headers.get("content-type", "").startswith("text/event-stream"):
                assert "data: [DONE]" in answer.text or '"error"' in answer.text, (body, answer.text[-300:])
            seen.add(answer.status_code)
    assert {200, 400} <= seen  # the fuzzer reached both the engine and the validator
    assert_serving(box, key)
    box.manage("audit_verify")


# --- slow clients ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def strict_box(tmp_path_factory):
    """Return (box, key) of a box of its own whose header and body deadlines are 2 s (defaults 10 s and 30 s)."""
    gen = start_box(tmp_path_factory, APPLIANCE_HEADER_TIMEOUT_S="2", APPLIANCE_BODY_TIMEOUT_S="2")
    box = next(gen)
    yield box, box.new_key("hostile-slow")
    gen.close()


def drip(conn: socket.socket, data: bytes, pause_s: float) -> int:
    """Send data a byte at a time until the server closes the connection; return how many bytes it took."""
    for sent, byte in enumerate(data):
        try:
            conn.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return sent
        time.sleep(pause_s)
    return len(data)


def test_a_client_dripping_its_headers_is_cut_and_the_box_keeps_answering(strict_box):
    box, key = strict_box
    with connect(box) as conn:
        request = head(CHAT, key, X_Padding="p" * 200)
        sent = drip(conn, request, pause_s=0.05)  # 0.05 s a byte: the headers would take over 10 s
        assert sent < len(request)
        assert closed_by_server(conn)
    assert httpx.get(box.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code == 200
    alive(box)


def test_a_connection_that_sends_nothing_is_closed(strict_box):
    box, _ = strict_box
    with connect(box) as conn:
        assert closed_by_server(conn)  # within the socket's 60 s bound: the header deadline closed it
    alive(box)


def test_a_client_dripping_its_body_gets_a_408_and_the_box_keeps_answering(strict_box):
    box, key = strict_box
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "y" * 400}]}).encode()
    with connect(box) as conn:
        conn.sendall(head(CHAT, key, Content_Length=str(len(body))))
        for byte in body:  # 0.05 s a byte: the body would take 20 s
            if select.select([conn], [], [], 0.05)[0]:
                break  # the server answered before the body was complete
            conn.sendall(bytes([byte]))
        status, headers, answer = read_response(conn)
        assert status == 408 and json.loads(answer)["error"]["code"] == "request_timeout"
        assert closed_by_server(conn)
    assert httpx.get(box.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code == 200
    alive(box)
    box.manage("audit_verify")
