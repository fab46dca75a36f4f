"""A vLLM deployment over two nodes of one appliance, with real processes: node-1 is the head, whose engine serves
the API, and node-2's web process starts the deployment's part there (vLLM's headless data-parallel rank), which
joins the head's engine; either node's API answers for it. vLLM's CPU build runs one rank per box.

Selected only by `pytest -m vllm` (tests/conftest.py), as tests/e2e/test_vllm_engine.py; it fails, never skips,
without vLLM's virtualenv.
"""
import json
import os
import signal
import time

import openai
import psutil
import pytest

from tests.e2e.test_vllm_engine import vllm_python
from tests.livebox import free_port, start_nodes

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.timeout(1800)]
NAME = "dense-over-nodes"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    yield from start_nodes(tmp_path_factory, 2, APPLIANCE_VLLM_PYTHON=vllm_python(), VLLM_CPU_KVCACHE_SPACE="1",
                           APPLIANCE_NODE_HEARTBEAT_S="1")


def load_events(box) -> list[list]:
    """Return the ledger's engine events of the variant as [action, outcome, node, part, pid], oldest first."""
    script = ("import json\nfrom audit.models import AuditEvent as E\n"
              "print(json.dumps([[e.action, e.outcome, e.details['node'], e.details.get('part'), "
              "e.details.get('pid')] for e in E.objects.filter(target=%r, action__in=['deployment.load', "
              "'deployment.unload', 'deployment.crashed']).order_by('seq')]))" % NAME)
    return json.loads(box.manage("shell", "--no-imports", "-c", script).stdout.strip().splitlines()[-1])


def started(box, node: str, part: int | None, after: int = 0) -> int:
    """Wait for the head's engine (part None) or a part to be recorded started on `node` (after the first `after`
    events); return its pid."""
    deadline = time.monotonic() + 900
    while True:
        loads = [e for e in load_events(box)[after:] if e[:4] == ["deployment.load", "ok", node, part]]
        if loads:
            return loads[-1][4]
        assert time.monotonic() < deadline, f"{node}'s engine did not start: {load_events(box)}"
        time.sleep(2)


def chat(box, key) -> str:
    sdk = openai.OpenAI(base_url=f"{box.url}/v1", api_key=key, max_retries=0, timeout=300)
    answer = sdk.chat.completions.create(model=NAME, messages=HELLO, max_tokens=4, temperature=0)
    assert answer.usage.completion_tokens == 4
    return answer.choices[0].message.content


def test_a_deployment_over_two_nodes_runs_a_part_on_each_and_answers_from_the_head(two_nodes):
    first, second = two_nodes
    first.manage("import_model", str(first.demo_dir / "demo-dense"), "--name", NAME, "--kind", "dense", "--wait")
    out = first.manage("deploy", NAME, "--engine", "vllm", "--node", "node-1", "--part", "node-2", "--rpc-port",
                       str(free_port()), "--wait", "--timeout", "900", timeout=960).stdout
    # The head's /health answered, which vLLM's head does only once every data-parallel rank has joined its engine.
    assert "parts on node-2" in out and "(vllm)" in out, out
    pid = started(first, "node-2", 1)
    head_pid = started(first, "node-1", None)
    part = psutil.Process(pid)
    command = part.cmdline()
    assert "inference.vllm_launch" in command and "--headless" in command
    assert command[command.index("--data-parallel-start-rank") + 1] == "1"
    assert command[command.index("--data-parallel-address") + 1] == "127.0.0.1"  # node-1's host: the head
    assert part.environ()["APPLIANCE_ENGINE_PEERS"] == "127.0.0.1"  # what its guard lets it reach off loopback
    part_log = (second.home / "logs" / f"engine-{NAME}-part.log").read_text(errors="replace")
    assert "EngineCore_DP1" in part_log and "headless mode" in part_log

    key = first.new_key("over-nodes")
    # node-2 serves no API for it (its part has none): it forwards to the head, as for any variant served elsewhere.
    assert chat(second, key) == chat(first, key)

    # The part's process group is killed: node-2 records the crash, and the whole engine starts again (a new rank 1
    # would not rejoin the head's running engine): node-1's head and node-2's part, with new processes.
    events_before = len(load_events(first))
    os.killpg(pid, signal.SIGKILL)
    restarted = started(first, "node-2", 1, after=events_before)
    assert started(first, "node-1", None, after=events_before) != head_pid
    assert restarted != pid
    assert ["deployment.crashed", "restarting", "node-2", 1, pid] in load_events(first)
    deadline = time.monotonic() + 900
    while True:
        try:
            chat(first, key)
            break
        except openai.APIError as exc:
            assert time.monotonic() < deadline, f"the deployment did not answer again: {exc}; {load_events(first)}"
            time.sleep(5)

    restarted = started(first, "node-2", 1)  # the part that joined the head's new engine (the latest started)
    first.manage("undeploy", NAME)
    deadline = time.monotonic() + 120
    while psutil.pid_exists(restarted) and psutil.Process(restarted).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "node-2's part outlived the undeploy"
        time.sleep(1)
    assert ["deployment.unload", "ok", "node-2", 1, None] in load_events(first)
