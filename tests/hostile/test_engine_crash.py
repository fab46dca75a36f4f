"""An engine process killed under load (SIGKILL, as the OOM killer does): its requests fail in OpenAI's shape,
the web process keeps answering (another variant, the console), the reconciler records the crash and the
engine comes back, and the ledger verifies."""
import os
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

HELLO = [{"role": "user", "content": "Tell me about the box."}]


def engine_process(box, name: str) -> psutil.Process | None:
    """Return the web process's engine child that serves name, or None."""
    for child in psutil.Process(box.procs["web"].pid).children():
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if "appliance.engine_process" in cmdline and cmdline[cmdline.index("--name") + 1] == name:
            return child
    return None


def wait_for(condition, what: str, timeout_s: float = 240):
    """Return condition()'s first truthy value (a bound on waiting, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"never: {what}")


@pytest.fixture(scope="module")
def crashy(box):
    for name in ("crash-dense", "crash-bystander"):
        box.manage("import_model", str(box.demo_dir / "demo-dense"), "--name", name, "--kind", "dense", "--wait")
        box.manage("deploy", name, "--wait")
    return "crash-dense", "crash-bystander"


def test_a_killed_engine_fails_its_requests_and_comes_back(box, crashy):
    victim, bystander = crashy
    key = box.new_key("crash")
    client = openai.OpenAI(base_url=f"{box.url}/v1", api_key=key, max_retries=0, timeout=120)
    first = engine_process(box, victim)
    assert first is not None

    outcomes = {}

    def stream_until_killed():
        try:
            stream = client.chat.completions.create(model=victim, messages=HELLO, max_tokens=1500, stream=True,
                                                    extra_body={"ignore_eos": True})  # still running when killed
            for _ in stream:
                outcomes.setdefault("streaming", True)
            outcomes["stream"] = "ended"
        except openai.APIError as exc:
            outcomes["stream"] = exc

    reader = threading.Thread(target=stream_until_killed)
    reader.start()
    wait_for(lambda: outcomes.get("streaming"), "the stream is running")
    os.kill(first.pid, signal.SIGKILL)
    reader.join(timeout=120)
    assert isinstance(outcomes["stream"], openai.APIError), outcomes
    assert "killed by SIGKILL" in str(outcomes["stream"])

    # The web process keeps serving: another variant answers, the console answers.
    reply = client.chat.completions.create(model=bystander, messages=HELLO, max_tokens=4)
    assert reply.usage.completion_tokens >= 1
    assert httpx.get(f"{box.url}/admin/login/").status_code == 200

    # While it restarts the model is a 503 in OpenAI's shape; then it answers again from a new process.
    def served_again():
        try:
            return client.chat.completions.create(model=victim, messages=HELLO, max_tokens=4)
        except openai.APIStatusError as exc:
            assert exc.status_code == 503, exc
            assert exc.body["code"] == "model_not_loaded", exc.body
            return None

    assert wait_for(served_again, "the engine is back").usage.completion_tokens >= 1
    second = engine_process(box, victim)
    assert second is not None and second.pid != first.pid

    box.manage("audit_verify")
    events = box.manage("shell", "--no-imports", "-c", "from audit.models import AuditEvent as E; print('\\n'.join("
                        f"f'{{e.action}} {{e.outcome}} {{e.details}}' for e in E.objects.filter(target='{victim}')"
                        ".order_by('seq')))").stdout
    assert "deployment.crashed restarting" in events and str(first.pid) in events
    assert events.count("deployment.load ok") == 2
