"""What the web process sends a vLLM engine for one request, and how vLLM's refusals come back (no engine needed).

The end-to-end behaviour, with vLLM's CPU build, is tests/e2e/test_vllm_engine.py (`pytest -m vllm`).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.vllm_engine import (completion_body, engine_environment, eplb_figures, lark_grammar, logprob_entries,
                                   refusal, vllm_arguments)
from inference.engine.grammar import json_schema_grammar
from inference.engine.request import EngineBusy, EngineClosed, FieldNotHonoured, PromptTooLong, SamplingParams


def test_the_body_carries_the_token_ids_and_every_sampling_field_vllm_honours():
    params = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=20, stop=("###",), seed=3,
                            presence_penalty=0.1, frequency_penalty=0.2, logit_bias={5: -100.0}, min_tokens=2,
                            ignore_eos=True, stop_token_ids=(9,))
    body = completion_body("dense", [1, 2, 3], params, "team-a")
    assert body["prompt"] == [1, 2, 3] and body["model"] == "dense" and body["max_tokens"] == 7
    assert (body["temperature"], body["top_p"], body["top_k"], body["seed"]) == (0.5, 0.9, 20, 3)
    assert body["stop"] == ["###"] and body["stop_token_ids"] == [9] and body["logit_bias"] == {"5": -100.0}
    assert (body["min_tokens"], body["ignore_eos"]) == (2, True)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert body["cache_salt"] == "team-a"  # one team's prompts never reuse another team's KV


def test_unset_fields_are_left_to_vllms_defaults():
    body = completion_body("dense", [1], SamplingParams(), None)
    assert not {"top_k", "stop", "seed", "logit_bias", "stop_token_ids", "cache_salt", "logprobs",
                "return_tokens_as_token_ids", "structured_outputs"} & set(body)


@pytest.mark.parametrize("alternatives", [0, 3])
def test_logprobs_are_asked_for_with_tokens_as_ids(alternatives):
    body = completion_body("dense", [1], SamplingParams(logprobs=alternatives), None)
    assert body["logprobs"] == alternatives and body["return_tokens_as_token_ids"] is True


def test_vllms_logprobs_become_the_builtin_engines_entries_most_likely_first():
    given = {"tokens": ["token_id:7", "token_id:9"], "token_logprobs": [-0.5, -3.0], "text_offset": [0, 1],
             # the second token was not among the 2 most likely: vLLM adds it to them
             "top_logprobs": [{"token_id:7": -0.5, "token_id:8": -1.5},
                              {"token_id:9": -3.0, "token_id:4": -0.1, "token_id:5": -0.9}]}
    entries = logprob_entries(given, 2, lambda token: f"<{token}>")
    assert entries == [{"token": "<7>", "logprob": -0.5, "top": [["<7>", -0.5], ["<8>", -1.5]]},
                       {"token": "<9>", "logprob": -3.0, "top": [["<4>", -0.1], ["<5>", -0.9]]}]
    assert logprob_entries(given, 0, str)[0]["top"] == []
    assert logprob_entries(None, 2, str) == []


def test_the_builtin_engines_json_schema_grammar_goes_to_vllm_as_lark_with_its_options():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    body = completion_body("dense", [1], SamplingParams(grammar=json_schema_grammar(schema)), None)
    lark = body["structured_outputs"]["grammar"]
    assert lark.startswith("start: %json ")
    assert json.loads(lark[len("start: %json "):]) == {**schema, "x-guidance": {"whitespace_flexible": False}}
    assert completion_body("dense", [1], SamplingParams(grammar="start: /x/"), None)["structured_outputs"] == {
        "grammar": "start: /x/"}


def test_a_grammar_of_several_parts_is_refused_naming_response_format():
    with pytest.raises(FieldNotHonoured) as info:
        lark_grammar(json.dumps({"grammars": [{"json_schema": {}}, {"lark_grammar": "start: /x/"}]}))
    assert info.value.param == "response_format" and "builtin engine only" in str(info.value)


@pytest.mark.parametrize("status,text,kind", [
    (400, '{"error": {"message": "This model\'s maximum context length is 2048 tokens."}}', PromptTooLong),
    (400, '{"error": {"message": "top_k must be -1 or at least 1"}}', FieldNotHonoured),
    (503, "overloaded", EngineBusy),
    (500, "boom", EngineClosed),
])
def test_vllms_refusals_come_back_as_the_builtin_engines(status, text, kind):
    assert type(refusal(status, text)) is kind


# vLLM's ErrorResponse, as its create_error_response writes it: `param` is the field of its own request body that a
# VLLMValidationError names, null for the errors that name none.
@pytest.mark.parametrize("error,param", [
    ({"message": "Invalid grammar specification.", "param": "structured_outputs"}, "response_format"),
    ({"message": "top_k must be -1 or at least 1", "param": None}, "top_k"),
    ({"message": "logit_bias token 9999 is out of the vocabulary; presence_penalty is fine", "param": None},
     "logit_bias"),
    ({"message": "the stop list is too long", "param": "stop"}, "stop"),
    ({"message": "something went wrong in the request", "param": None}, None),
])
def test_a_field_vllm_refuses_is_named_in_the_team_apis_words(error, param):
    sent = completion_body("dense", [1, 2], SamplingParams(top_k=5, logit_bias={3: 1.0}, grammar="start: /x/"), "t")
    exc = refusal(400, json.dumps({"error": {**error, "type": "BadRequestError", "code": 400}}), sent)
    assert type(exc) is FieldNotHonoured and exc.param == param
    assert error["message"] in str(exc)


def test_the_engine_listens_on_loopback_and_gets_no_database_broker_or_proxy(settings, monkeypatch, tmp_path):
    for name, value in {"DATABASE_URL": "postgres://secret@db/x", "CELERY_BROKER_URL": "redis://r/0",
                        "HTTPS_PROXY": "http://proxy:3128", "VLLM_CPU_KVCACHE_SPACE": "2"}.items():
        monkeypatch.setenv(name, value)
    env = engine_environment(tmp_path)
    assert not {"DATABASE_URL", "CELERY_BROKER_URL", "HTTPS_PROXY"} & set(env)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["HOME"] == str(tmp_path)
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    # Its own address is given, not found by a UDP socket towards 8.8.8.8; it reaches no other node.
    assert (env["VLLM_HOST_IP"], env["APPLIANCE_ENGINE_PEERS"]) == ("127.0.0.1", "")
    over_nodes = engine_environment(tmp_path, ["10.0.0.1"], "10.0.0.2")
    assert (over_nodes["VLLM_HOST_IP"], over_nodes["APPLIANCE_ENGINE_PEERS"]) == ("10.0.0.2", "10.0.0.1")
    args = vllm_arguments("dense", tmp_path, 8000)
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert "--trust-remote-code" not in args
    assert args[args.index("--logprobs-mode") + 1] == "raw_logprobs"  # the model's own distribution, as builtin
    assert json.loads(args[args.index("--structured-outputs-config") + 1]) == {"backend": "guidance"}


# vLLM's EPLB load report, in the words of its EplbState.step (checked against vLLM's own source in CI's vLLM step:
# tests/e2e/test_vllm_engine.py). EPLB needs expert parallelism over GPUs, so no engine here writes one.
def eplb_line(step: int, balancedness: float) -> str:
    return (f"INFO 12-02 10:00:00 [eplb_state.py:635] EPLB step: {step} for model main: avg_tokens=1200.50, "
            f"max_tokens=1500, balancedness={balancedness:.4f}, steps until the next rearrangement: 2900\n")


def test_the_latest_eplb_report_of_this_engine_process_is_read_from_its_log(tmp_path):
    log = tmp_path / "engine-moe.log"
    log.write_text("an earlier run\n" + eplb_line(900, 0.5))
    start = log.stat().st_size
    assert eplb_figures(log, start) is None  # the earlier process's report is not this one's
    with open(log, "a") as f:
        f.write("INFO loading\n" + eplb_line(100, 0.8004) + "INFO a request\n" + eplb_line(200, 0.9123))
        f.write("INFO 12-02 10:00:01 [eplb_state.py:635] EPLB step: 300 for model main: avg_tok")  # torn
    assert eplb_figures(log, start) == {"step": 200, "avg_tokens": 1200.5, "max_tokens": 1500,
                                        "balancedness": 0.9123}
    assert eplb_figures(tmp_path / "missing.log", 0) is None


class EplbEngine:
    """Stands in for a VllmClient under expert parallelism (GPUs only): its scrape and its EPLB report."""

    def __init__(self, report):
        self.report = report

    def scraped(self):
        return []

    def eplb(self):
        return self.report


def test_metrics_carry_vllms_eplb_report_per_variant():
    from appliance import engine_client
    from appliance.external_metrics import ExternalEngineCollector

    engine_client.register("r1-ep", EplbEngine({"step": 200, "avg_tokens": 1200.5, "max_tokens": 1500,
                                                "balancedness": 0.91}))
    engine_client.register("dense-vllm", EplbEngine(None))
    try:
        families = {f.name: f.samples for f in ExternalEngineCollector().collect()}
    finally:
        engine_client.unregister("r1-ep")
        engine_client.unregister("dense-vllm")
    assert [(s.labels, s.value) for s in families["appliance_vllm_eplb_balancedness"]] == [({"model": "r1-ep"}, 0.91)]
    assert families["appliance_vllm_eplb_max_tokens"][0].value == 1500
    assert families["appliance_vllm_eplb_step"][0].value == 200


GUARD_CHECK = """
import sys
from inference import vllm_guard
if sys.argv[1] == "guarded":
    vllm_guard.guard_this_interpreter()
print(vllm_guard.outside_connection_refused())
"""


@pytest.mark.parametrize("interpreter", ["guarded", "bare"])
def test_the_engines_guard_check_asks_the_guard_and_connects_nowhere(interpreter):
    # The check raises socket.connect's audit event by hand: in an interpreter without the guard it must say so
    # (nothing refused it) rather than connect, so no packet is ever aimed off loopback.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, "-c", GUARD_CHECK, interpreter], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    said = run.stdout.strip().splitlines()[-1]
    if interpreter == "guarded":
        assert said.startswith("refused: egress refused: socket.connect to 192.0.2.1:443"), run.stdout + run.stderr
    else:
        assert said == "not refused", run.stdout + run.stderr
