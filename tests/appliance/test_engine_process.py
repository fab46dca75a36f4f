"""Each deployment's engine runs in a child process of the web process: it serves over the socketpair, carries
the egress guard and the offline settings, and when it dies its requests fail cleanly and the reconciler
records it and starts it again, a bounded number of times."""
import asyncio
import os
import signal

import psutil
import pytest

from appliance import engine_client, reconciler
from appliance.actions import do_deploy
from appliance.models import Deployment
from audit.models import AuditEvent
from inference.engine import EngineClosed, EngineConfig, PromptTooLong, SamplingParams
from tests.appliance.test_runaway import imported, last_event
from tests.inference.conftest import run

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def client(demo_dir):
    # Exact mode, so its greedy answers equal the shared in-process engine's bit for bit.
    engine = engine_client.start_engine("proc-dense", demo_dir / "demo-dense", EngineConfig(device="cpu", exact=True))
    yield engine
    engine.close()


async def answer(engine, max_tokens: int = 8, **params) -> tuple[str, object]:
    handle = engine.submit(engine.encode_chat(HELLO), SamplingParams(max_tokens=max_tokens, **params))
    await handle.accepted()
    text, last = [], None
    async for chunk in handle:
        text.append(chunk.text)
        last = chunk
    return "".join(text), last


def until(condition, what: str, tries: int = 3000) -> None:
    """Wait for condition() (a bound on waiting, not a timing assertion)."""
    import time

    for _ in range(tries):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"never: {what}")


def test_the_engine_is_a_child_process_that_answers_like_the_engine(client, engines):
    child = psutil.Process(client.pid)
    assert client.pid != os.getpid() and child.ppid() == os.getpid()
    assert "appliance.engine_process" in child.cmdline()
    text, last = run(answer(client, temperature=0))
    assert last.finish_reason == "length" and last.completion_tokens == 8
    # The same greedy answer as the in-process engine on the same weights, both in exact mode.
    alone_text, _ = run(answer(engines["demo-dense"], temperature=0))
    assert text == alone_text
    assert client.describe()["model"] == "demo-dense" and client.exact is True


def test_the_engine_process_runs_under_the_guard_and_offline(client):
    report = client.process_report
    assert report["pid"] == client.pid
    assert report["guard_installed"] is True
    assert report["environment"]["HF_HUB_OFFLINE"] == "1"
    assert report["libraries_read"]["transformers.is_offline_mode()"] is True
    assert report["libraries_read"]["huggingface_hub.HF_HUB_OFFLINE"] is True


def test_refusals_cross_the_process_boundary_as_the_engine_raises_them(client):
    async def refused(prompt, **params):
        handle = client.submit(prompt, SamplingParams(**params))
        await handle.accepted()

    with pytest.raises(PromptTooLong):
        run(refused([1] * 10, max_tokens=client.max_request_tokens()))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        run(refused([client.vocab_size + 5], max_tokens=2))
    assert run(answer(client))[1].finish_reason in ("length", "stop")  # and it still serves


def test_sigkill_fails_the_requests_in_flight_and_refuses_new_ones(client):
    async def scenario():
        handle = client.submit(client.encode_chat(HELLO), SamplingParams(max_tokens=1500, temperature=0))
        await handle.accepted()
        chunks = aiter(handle)
        await anext(chunks)  # it is running
        os.kill(client.pid, signal.SIGKILL)
        last = None
        async for last in chunks:
            pass
        return last

    last = run(scenario())
    assert last.finish_reason == "error" and "killed by SIGKILL" in last.error
    until(lambda: not client.alive, "the client notices the exit")
    with pytest.raises(EngineClosed, match="killed by SIGKILL"):
        run(answer(client))


def test_closing_leaves_no_process(demo_dir):
    engine = engine_client.start_engine("proc-close", demo_dir / "demo-dense", EngineConfig(device="cpu"))
    pid = engine.pid
    engine.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert engine.exit_reason == "closed"


def test_a_model_that_cannot_load_fails_the_start_with_its_reason(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(engine_client.EngineStartFailed, match="ModelOutOfBounds: .*has no num_hidden_layers"):
        engine_client.start_engine("proc-broken", tmp_path, EngineConfig(device="cpu"))


@pytest.mark.django_db
def test_the_reconciler_restarts_a_killed_engine_then_gives_up(demo_dir, monkeypatch,
                                                               django_capture_on_commit_callbacks):
    monkeypatch.setattr(reconciler, "RESTARTS_ALLOWED", 1)
    variant = imported(demo_dir, django_capture_on_commit_callbacks, name="proc-crashy")
    do_deploy(variant, actor="test")
    try:
        reconciler.reconcile_once()
        first = engine_client.get(variant.name)
        assert first is not None and first.alive
        start = last_event("process.start", variant.name)
        assert start.actor == f"system:engine:{variant.name}" and start.details["pid"] == first.pid
        assert start.details["guard_installed"] is True

        os.kill(first.pid, signal.SIGKILL)
        until(lambda: not first.alive, "the first engine's exit is seen")
        reconciler.reconcile_once()  # crash 1 of 1 allowed: recorded, then started again
        second = engine_client.get(variant.name)
        assert second is not None and second.alive and second.pid != first.pid
        crash = last_event("deployment.crashed", variant.name)
        assert crash.outcome == "restarting" and "killed by SIGKILL" in crash.details["reason"]
        assert crash.details["pid"] == first.pid
        assert run(answer(second))[1].finish_reason in ("length", "stop")

        os.kill(second.pid, signal.SIGKILL)
        until(lambda: not second.alive, "the second engine's exit is seen")
        reconciler.reconcile_once()  # crash 2: past the budget
        assert engine_client.get(variant.name) is None
        deployment = Deployment.objects.get(variant=variant)
        assert deployment.actual == "failed"
        assert "killed by SIGKILL" in deployment.detail and "not restarted" in deployment.detail
        assert last_event("deployment.crashed", variant.name).outcome == "failed"
        variant.refresh_from_db()
        assert variant.status == "ready"
        assert AuditEvent.objects.filter(action="deployment.load", target=variant.name, outcome="ok").count() == 2
    finally:
        engine = engine_client.unregister(variant.name)
        if engine is not None:
            engine.close()
