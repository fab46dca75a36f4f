"""A deployment served by vLLM: its engine process on this node, supervised like the builtin one, and its client.

`start_vllm` starts `python -m inference.vllm_launch` with vLLM's own interpreter (settings.VLLM_PYTHON), from the
variant's store path, its OpenAI server bound to 127.0.0.1 on a free port, with a small environment of its own
(no database or broker URL, no proxies; the guard's sitecustomize first on PYTHONPATH). It is ready when vLLM's
/health answers 200; the launcher's report of the guard and telemetry switches, as that interpreter saw them, is
what the deployment.load event records.

The client answers the team API as appliance.engine_client.EngineClient does: the web process renders the chat
with the variant's own template and tokenizer, sends the token ids to vLLM's /v1/completions (streamed, usage on
every chunk) and turns vLLM's chunks into the engine's Chunks. So keys, quotas, usage, transcripts and the
ledger's digests are settled by the same code as on the builtin engine. Log probabilities are vLLM's raw ones
(the model's own distribution, as the builtin engine's), their tokens sent as ids and named with the variant's
tokenizer, so the API's logprobs have the builtin engine's shape. Structured output (response_format json_schema /
json_object, forced tool calls) is the builtin engine's own llguidance grammar, given to vLLM's guidance backend
as Lark text; what vLLM is not asked to do is refused as a 400 naming the field. When the process ends unasked,
its streams end in an error chunk and the reconciler restarts it, as for the builtin engine; a process that is
alive but whose /health has not answered 200 for settings.ENGINE_HUNG_AFTER_S is killed, group and all, and goes
the same way, its exit recorded as hung.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx
from django.conf import settings
from prometheus_client.parser import text_string_to_metric_families

from appliance.engine_client import (CLOSE_TIMEOUT_S, ClientBasics, EngineStartFailed, TaskHandle, exit_description,
                                     log_tail, loop_client, notify_gone)
from appliance.names import is_valid_name
from audit import egress
from inference.engine.prompt import load_tokenizer
from inference.engine.request import (Chunk, EngineBusy, EngineClosed, FieldNotHonoured, PromptTooLong,
                                      SamplingParams)
from inference.vllm_guard import PEERS_VARIABLE, TELEMETRY_OFF

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
SITE_DIR = ROOT / "inference" / "vllm_site"  # its sitecustomize installs the guard in every vLLM interpreter
READY_POLL_S = 0.5
HEALTH_POLL_S = 1.0  # how often a running engine's /health is asked (settings.ENGINE_HUNG_AFTER_S: when it is hung)
HEALTH_TIMEOUT_S = 5.0  # one /health question's wait: a stopped process's kernel still accepts the connection
# Read without a deadline: a long answer streams for minutes. Connecting is loopback: seconds mean it is gone.
HTTP_TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None)
METRICS_MAX_AGE_S = 1.0  # /metrics and the console ask several times per scrape; vLLM is asked once
# What the engine's environment keeps of the web process's: nothing that names a database, a broker, a proxy or a
# secret. vLLM's own VLLM_* settings pass (its CPU KV space, threads), except the telemetry ones vllm_guard sets.
KEPT_VARIABLES = ("PATH", "LANG", "LC_ALL", "TMPDIR", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "TZ")
# vLLM's finish reasons, in the builtin engine's words.
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_environment(home: Path, peers: Iterable[str] = (), host: str = "127.0.0.1") -> dict[str, str]:
    """Return the vLLM process's environment: the kept variables, its own HOME, the guard's site first on the path,
    the hosts of the other nodes of a deployment over several boxes (`peers`), which its guard lets it reach, and
    this node's `host`, the address its ranks give the others."""
    env = {name: value for name, value in os.environ.items() if name in KEPT_VARIABLES or name.startswith("VLLM_")}
    # sitecustomize sets the switches again inside each interpreter; set here too, they are what /proc shows.
    env.update(egress.OFFLINE_ENVIRONMENT, **TELEMETRY_OFF)
    env.update(HOME=str(home), PYTHONPATH=str(SITE_DIR), PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1")
    env[PEERS_VARIABLE] = ",".join(peers)
    # vLLM finds its own address by connecting a UDP socket towards 8.8.8.8 (the guard refuses it) unless told it.
    env["VLLM_HOST_IP"] = host
    return env


def vllm_arguments(name: str, model_dir: Path, port: int, flags: Iterable[str] = ()) -> list[str]:
    """Return the vLLM server's arguments: the store path, loopback only, usage with cached tokens, no model defaults."""
    return ["--model", str(model_dir), "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
            # Sampling is what the request says, as on the builtin engine, not the checkpoint's generation_config.
            "--generation-config", "vllm", "--enable-prompt-tokens-details", "--disable-uvicorn-access-log",
            # Log probabilities under the model's own distribution, before penalties and temperature, as the
            # builtin engine gives them.
            "--logprobs-mode", "raw_logprobs",
            # Structured output by llguidance, the library of the builtin engine's grammars, given their own text.
            "--structured-outputs-config", '{"backend": "guidance"}', *flags]


def launch(name: str, python: str, arguments: list[str], peers: Iterable[str] = (), host: str = "127.0.0.1",
           role: str = "") -> tuple[subprocess.Popen, Path, Path, int]:
    """Start inference.vllm_launch with vLLM's `arguments`; return the process, its log, where this process's lines
    in the log begin, and where its guard report will be. `role` tells apart the files of a part ("part")."""
    if not is_valid_name(name):  # it names the log and report files
        raise EngineStartFailed(f"{name!r} is not a valid variant name")
    home = Path(settings.APPLIANCE_HOME) / "engines" / "vllm"
    home.mkdir(parents=True, exist_ok=True)
    suffix = f"-{role}" if role else ""
    log_path = Path(settings.APPLIANCE_HOME) / "logs" / f"engine-{name}{suffix}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    report_path = home / f"{name}{suffix}.report.json"
    report_path.unlink(missing_ok=True)
    log_start = log_path.stat().st_size if log_path.exists() else 0  # the log is appended to across restarts
    command = [python, "-m", "inference.vllm_launch", "--report", str(report_path), "--", *arguments]
    with open(log_path, "ab") as log_file:
        # Its own process group, so the EngineCore processes vLLM starts are stopped with it; stdin is the pipe
        # whose closing tells the launcher the web process has gone.
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT,
                                   cwd=home, env=engine_environment(home, peers, host), start_new_session=True)
    return process, log_path, report_path, log_start


def start_vllm(name: str, model_dir: Path, python: str, flags: Iterable[str] = (), peers: Iterable[str] = (),
               host: str = "127.0.0.1") -> "VllmClient":
    """Start one deployment's vLLM engine process and return its client once /health answers (the head of a
    deployment over several boxes answers once every part's ranks have joined it)."""
    port = free_port()
    process, log_path, report_path, log_start = launch(name, python, vllm_arguments(name, model_dir, port, flags),
                                                       peers, host)
    url = f"http://127.0.0.1:{port}"
    try:
        await_health(url, process, log_path, settings.EXTERNAL_ENGINE_READY_S)
        report = json.loads(report_path.read_text(encoding="utf-8"))
        card = httpx.get(f"{url}/v1/models", timeout=10, trust_env=False).json()["data"][0]
        return VllmClient(name, model_dir, process, url, report, int(card["max_model_len"]), (log_path, log_start))
    except BaseException:
        stop_group(process)
        raise


def start_vllm_part(name: str, model_dir: Path, python: str, flags: list[str], peers: Iterable[str],
                    host: str) -> "VllmPart":
    """Start this node's part of a deployment over several boxes (vLLM's headless data-parallel ranks, which join
    the head's engine) and return it once its interpreter has reported its guard; the head's /health says when the
    whole engine is up."""
    # The arguments the head's engine is built from, less its API server's: a part serves no API.
    arguments = ["--model", str(model_dir), "--served-model-name", name, "--generation-config", "vllm",
                 "--logprobs-mode", "raw_logprobs", "--structured-outputs-config", '{"backend": "guidance"}', *flags]
    process, log_path, report_path, _ = launch(name, python, arguments, peers, host, role="part")
    deadline = time.monotonic() + settings.EXTERNAL_ENGINE_READY_S
    try:
        while not report_path.exists():
            if process.poll() is not None:
                raise EngineStartFailed(f"the vLLM part process {exit_description(process.returncode)} while "
                                        f"starting; last lines of {log_path}: {log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise EngineStartFailed(f"the vLLM part process did not start within "
                                        f"{settings.EXTERNAL_ENGINE_READY_S:.0f} s; last lines of {log_path}: "
                                        f"{log_tail(log_path)}")
            time.sleep(READY_POLL_S)
        return VllmPart(name, process, json.loads(report_path.read_text(encoding="utf-8")))
    except BaseException:
        stop_group(process)
        raise


class GroupLife:
    """The life of a vLLM process group this web process started (an engine, or a part): close() stops it, and a
    thread running _watch records how it ended and tells the reconciler."""

    kind = "engine"
    name: str
    process: subprocess.Popen
    pid: int
    _closing = False
    _hung: str | None = None  # why a health watch killed it, when one did
    exit_reason: str | None = None

    @property
    def alive(self) -> bool:
        return self.exit_reason is None

    def close(self) -> None:
        """Stop it: SIGTERM to its process group, SIGKILL to what is left after CLOSE_TIMEOUT_S."""
        self._closing = True
        stop_group(self.process, grace_s=CLOSE_TIMEOUT_S)
        if self.process.stdin:
            self.process.stdin.close()

    def _watch(self) -> None:
        code = self.process.wait()
        self._ended.set()
        stop_group(self.process)  # the EngineCore processes it left behind, if it was killed
        self.exit_reason = "closed" if self._closing else self._hung or exit_description(code)
        if not self._closing:
            log.error("vLLM %s process of %s (pid %d) %s", self.kind, self.name, self.pid, self.exit_reason)
        notify_gone(self)


class VllmPart(GroupLife):
    """This node's part of a deployment over several boxes: a process group that serves no API of its own."""

    kind = "part"
    engine = "vllm"

    def __init__(self, name: str, process: subprocess.Popen, report: dict):
        self.name, self.process, self.pid, self.process_report = name, process, process.pid, report
        self.device = report["device"]
        self._ended = threading.Event()
        threading.Thread(target=self._watch, name=f"vllm-part-watch:{name}", daemon=True).start()


def healthy(url: str, timeout_s: float) -> bool:
    """Return whether the engine's /health answers 200 within timeout_s."""
    try:
        return httpx.get(f"{url}/health", timeout=timeout_s, trust_env=False).status_code == 200
    except httpx.TransportError:
        return False


def await_health(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Return once the engine's /health answers 200; raise EngineStartFailed when it exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EngineStartFailed(f"the vLLM engine process {exit_description(process.returncode)} while "
                                    f"loading; last lines of {log_path}: {log_tail(log_path)}")
        if healthy(url, 2):
            return
        time.sleep(READY_POLL_S)
    raise EngineStartFailed(f"the vLLM engine did not answer /health within {timeout_s:.0f} s; "
                            f"last lines of {log_path}: {log_tail(log_path)}")


def stop_group(process: subprocess.Popen, grace_s: float = 0.0) -> None:
    """Stop the engine's process group: SIGTERM and up to grace_s to finish, then SIGKILL for what is left."""
    try:
        if grace_s:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing of the group is left
    process.wait()


def completion_body(name: str, prompt_ids: list[int], params: SamplingParams, scope: str | None) -> dict:
    """Return vLLM's /v1/completions body for one request; raise FieldNotHonoured for what it is not asked to do."""
    body = {"model": name, "prompt": prompt_ids, "max_tokens": params.max_tokens, "temperature": params.temperature,
            "top_p": params.top_p, "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty, "min_tokens": params.min_tokens,
            "ignore_eos": params.ignore_eos, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    optional = {"top_k": params.top_k or None, "stop": list(params.stop) or None, "seed": params.seed,
                "logit_bias": {str(t): b for t, b in params.logit_bias.items()} if params.logit_bias else None,
                "stop_token_ids": list(params.stop_token_ids) or None,
                # Tokens as ids ("token_id:N"): the client names them with the variant's tokenizer, as the builtin
                # engine does, whatever vLLM's detokenizer would have made of a partial character.
                "logprobs": params.logprobs, "return_tokens_as_token_ids": params.logprobs is not None or None,
                "structured_outputs": None if params.grammar is None else {"grammar": lark_grammar(params.grammar)},
                # The team is the prefix cache's scope, as on the builtin engine: vLLM never shares KV across salts.
                "cache_salt": scope}
    body.update({key: value for key, value in optional.items() if value is not None})
    return body


def lark_grammar(grammar: str) -> str:
    """Return the builtin engine's grammar (llguidance's grammar JSON, or Lark text) as the Lark text vLLM's
    guidance backend takes: a JSON schema becomes `start: %json <schema>`, its x-guidance options kept."""
    if not grammar.lstrip().startswith("{"):
        return grammar
    top = json.loads(grammar)
    parts = top.get("grammars") or []
    if len(parts) == 1 and top.get("max_tokens") is None:
        schema, lark = parts[0].get("json_schema"), parts[0].get("lark_grammar")
        if schema is not None and lark is None:
            return f"start: %json {json.dumps(schema)}"
        if lark is not None and schema is None:
            return lark
    raise FieldNotHonoured("This deployment runs on vLLM, which is given one JSON schema or Lark grammar per "
                           "request; this structured-output grammar is served on the builtin engine only.",
                           "response_format")


def refusal(status: int, text: str, sent: dict | None = None) -> Exception:
    """Return the engine's refusal of a request, as the builtin engine would raise it: a 400 names the field it
    refused (vLLM's `param`, else the field of `sent`, the body it was sent, that its message names), in the team
    API's words."""
    try:
        detail = json.loads(text)
        error = detail.get("error", detail) if isinstance(detail, dict) else {}
        message, param = str(error.get("message", text)), error.get("param")
    except (ValueError, AttributeError):
        message, param = text, None
    message = message[:500]
    if status == 400 and ("context length" in message or "maximum model length" in message):
        return PromptTooLong(message)
    if status in (429, 503):
        return EngineBusy(f"the vLLM engine is busy: {message}")
    if status < 500:
        field = param if isinstance(param, str) and param else field_named_in(message, sent or {})
        return FieldNotHonoured(f"The vLLM engine refused the request: {message}", API_FIELDS.get(field, field))
    return EngineClosed(f"the vLLM engine answered {status}: {message}")


# The fields of vLLM's request body whose team API name differs (the rest have the same names on both sides).
API_FIELDS = {"structured_outputs": "response_format", "return_tokens_as_token_ids": "logprobs"}


def field_named_in(message: str, sent: dict) -> str | None:
    """Return the first field of the body sent that vLLM's message names as a word, else None."""
    return next((word for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message) if word in sent), None)


class VllmClient(GroupLife, ClientBasics):
    """One deployment's vLLM engine process, as the web process sees it (the interface of EngineClient)."""

    engine = "vllm"
    exact = False

    def __init__(self, name: str, model_dir: Path, process: subprocess.Popen, url: str, report: dict,
                 context_length: int, log: tuple[Path, int]):
        """log: the engine's log file and where this process's lines in it begin."""
        self.name, self.model_dir, self.process, self.url, self.log = name, model_dir, process, url, log
        self.pid = process.pid
        self.process_report = report  # the launcher's own check of its guard and telemetry switches
        self.device = report["device"]
        self.context_length = self._max_request_tokens = context_length  # vLLM's max model length
        self.measured: dict = {}  # vLLM sizes its own KV cache; its figures are in its metrics
        self.tokenizer = load_tokenizer(model_dir)
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        self.vocab_size = int(config.get("vocab_size") or len(self.tokenizer))
        self._ended = threading.Event()
        self._http: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its AsyncClient
        self._scraped: tuple[float, list] = (0.0, [])
        self._scrape_lock = threading.Lock()
        threading.Thread(target=self._watch, name=f"vllm-watch:{name}", daemon=True).start()
        threading.Thread(target=self._watch_health, args=(settings.ENGINE_HUNG_AFTER_S,),
                         name=f"vllm-health:{name}", daemon=True).start()

    def submit(self, prompt_ids: Iterable[int], params: SamplingParams = SamplingParams(),
               cache_scope: str | None = None) -> "VllmHandle":
        """Send a request from inside a running event loop; `await handle.accepted()` before reading its chunks."""
        prompt_ids = [int(t) for t in prompt_ids]
        if prompt_ids and len(prompt_ids) + params.max_tokens > self._max_request_tokens:
            raise PromptTooLong(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                                f"exceeds this deployment's limit of {self.context_length} tokens")
        body = completion_body(self.name, prompt_ids, params, cache_scope)
        if not self.alive:
            raise EngineClosed(f"the vLLM engine process {self.exit_reason}")
        return VllmHandle(self._client(), body, None if params.logprobs is None else self.token_text)

    def token_text(self, token: int) -> str:
        """Return one token's text, as the builtin engine names the tokens of its log probabilities."""
        return self.tokenizer.decode([token])

    def _client(self) -> httpx.AsyncClient:
        return loop_client(self._http, base_url=self.url, timeout=HTTP_TIMEOUT)

    # ---- figures ---------------------------------------------------------------------------------

    def scraped(self) -> list:
        """Return the metric families of the engine's own /metrics, at most METRICS_MAX_AGE_S old ([] if gone)."""
        with self._scrape_lock:
            taken, families = self._scraped
            if time.monotonic() - taken > METRICS_MAX_AGE_S and self.alive:
                try:
                    text = httpx.get(f"{self.url}/metrics", timeout=2, trust_env=False).text
                    families = list(text_string_to_metric_families(text))
                except (httpx.TransportError, ValueError):
                    families = []
                self._scraped = (time.monotonic(), families)
            return families

    def describe(self) -> dict:
        """Return the builtin engine's figures that vLLM's metrics give (requests, tokens, finishes); 0 the rest."""
        figures = {"running": 0, "waiting": 0, "kv_budget_bytes": 0, "kv_reserved_bytes": 0, "mean_batch_size": 0,
                   "steps": 0, "step_seconds": 0, "prompt_tokens": 0, "generated_tokens": 0, "finished": {},
                   "resident_bytes": None}
        names = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
                 "vllm:prompt_tokens_total": "prompt_tokens", "vllm:generation_tokens_total": "generated_tokens"}
        for family in self.scraped():
            for sample in family.samples:
                if sample.name in names:
                    figures[names[sample.name]] += int(sample.value)
                elif sample.name == "vllm:request_success_total":
                    reason = FINISH_REASONS.get(sample.labels.get("finished_reason", ""), "stop")
                    figures["finished"][reason] = figures["finished"].get(reason, 0) + int(sample.value)
        return figures

    def telemetry(self) -> dict:
        """Return MoE routing telemetry: none per expert here (vLLM reports expert load only per rank: eplb())."""
        return {}

    def eplb(self) -> dict | None:
        """Return vLLM's latest EPLB load report of this process (eplb_figures), None before one or without EPLB."""
        return eplb_figures(*self.log)

    # ---- life --------------------------------------------------------------------------------------

    def _watch_health(self, hung_after_s: float) -> None:
        """Kill the process group of an engine that is alive but whose /health has not answered 200 for
        hung_after_s: _watch then records it as hung and the reconciler restarts it, as it does a crashed one."""
        answered = time.monotonic()
        while not self._ended.wait(HEALTH_POLL_S):
            if healthy(self.url, min(HEALTH_TIMEOUT_S, hung_after_s)):
                answered = time.monotonic()
            elif time.monotonic() - answered >= hung_after_s and not (self._closing or self._ended.is_set()):
                self._hung = f"was hung: its /health did not answer 200 for {hung_after_s:g} s, so it was killed"
                stop_group(self.process)
                return


# vLLM's EPLB load report, as its EplbState.step logs it every log_balancedness_interval steps (the fit plan's
# EP flags turn it on): the experts' token load summed over the MoE layers, its mean and its maximum over the EP
# ranks, and their ratio. The vLLM step of CI checks this against vLLM's own source (tests/e2e/test_vllm_engine.py).
EPLB_REPORT = re.compile(r"EPLB step: (?P<step>\d+) for model \S+: avg_tokens=(?P<avg_tokens>[\d.]+), "
                         r"max_tokens=(?P<max_tokens>\d+), balancedness=(?P<balancedness>[\d.]+)")
EPLB_TAIL_BYTES = 256 * 1024  # the latest report is near the end: every step of a busy engine logs a few lines


def eplb_figures(log_path: Path, start: int) -> dict | None:
    """Return the latest EPLB report in the log after byte `start` ({"step", "avg_tokens", "max_tokens",
    "balancedness"}), or None when there is none there."""
    try:
        with open(log_path, "rb") as log_file:
            size = log_file.seek(0, os.SEEK_END)
            log_file.seek(max(start, size - EPLB_TAIL_BYTES))
            tail = log_file.read().decode(errors="replace")
    except OSError:
        return None
    found = None
    for found in EPLB_REPORT.finditer(tail):
        pass
    if found is None:
        return None
    return {"step": int(found["step"]), "avg_tokens": float(found["avg_tokens"]),
            "max_tokens": int(found["max_tokens"]), "balancedness": float(found["balancedness"])}


def logprob_entries(given: dict | None, alternatives: int, token_text: Callable[[int], str]) -> list:
    """Return the logprobs of one of vLLM's chunks (tokens as "token_id:N") as the builtin engine's Chunk.logprobs:
    each token's {"token", "logprob", "top": [[text, logprob], ...]}, its `alternatives` most likely first."""
    def text(placeholder: str) -> str:
        if not placeholder.startswith("token_id:"):
            raise StreamError(f"the vLLM engine named a token {placeholder[:50]!r}, not by its id")
        return token_text(int(placeholder[len("token_id:"):]))

    given, entries = given or {}, []
    for token, logprob, top in zip(given.get("tokens") or (), given.get("token_logprobs") or (),
                                   given.get("top_logprobs") or ()):
        # vLLM adds the chosen token to the `alternatives` most likely ones when it is not among them.
        ranked = sorted((top or {}).items(), key=lambda item: item[1], reverse=True)[:alternatives]
        entries.append({"token": text(token), "logprob": logprob, "top": [[text(t), lp] for t, lp in ranked]})
    return entries


class VllmHandle(TaskHandle):
    """A request sent to vLLM: `await accepted()`, then `async for` yields its Chunks; leaving early closes its
    connection, and vLLM aborts a request whose client has gone."""

    def __init__(self, http: httpx.AsyncClient, body: dict, token_text: Callable[[int], str] | None = None) -> None:
        """token_text: how a token's text is written in the Chunks' logprobs; None when they were not asked for."""
        self.token_text = token_text
        self.alternatives = body.get("logprobs") or 0
        super().__init__(lambda: self._run(http, body))

    async def _run(self, http: httpx.AsyncClient, body: dict) -> None:
        state = {"prompt": 0, "completion": 0, "cached": 0, "finish": None}
        try:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    self._settle(refusal(response.status_code, (await response.aread()).decode(errors="replace"),
                                              body))
                    return
                self._settle(None)
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        break
                    self._absorb(json.loads(line[6:]), state)
            finish = FINISH_REASONS.get(state["finish"]) if state["finish"] else None
            self._put("", finish or "error", state, None if finish else "the vLLM stream ended without a finish")
        except httpx.HTTPError as exc:  # the engine process went away under the request
            if not self.answer.done():
                self._settle(EngineClosed(f"the vLLM engine cannot be reached ({type(exc).__name__})"))
            else:
                self._put("", "error", state, f"the vLLM engine process ended the stream ({type(exc).__name__})")
        except StreamError as exc:
            self._put("", "error", state, str(exc))
        except asyncio.CancelledError:  # cancelled before vLLM answered: whoever waits for the answer stops too
            self._settle(EngineClosed("the request was cancelled before the vLLM engine took it"))
            raise

    def _absorb(self, event: dict, state: dict) -> None:
        if "error" in event:
            raise StreamError(f"the vLLM engine failed the request: {str(event['error'])[:300]}")
        usage = event.get("usage") or {}
        if usage:
            state["prompt"], state["completion"] = usage["prompt_tokens"], usage.get("completion_tokens") or 0
            state["cached"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        for choice in event.get("choices") or ():
            state["finish"] = choice.get("finish_reason") or state["finish"]
            logprobs = self._logprobs(choice.get("logprobs"))
            if choice.get("text") or logprobs:
                self._put(choice.get("text") or "", None, state, logprobs=logprobs)

    def _logprobs(self, given: dict | None) -> list | None:
        if self.token_text is None:
            return None
        return logprob_entries(given, self.alternatives, self.token_text)

    def _put(self, text: str, finish: str | None, state: dict, error: str | None = None,
             logprobs: list | None = None) -> None:
        if logprobs is None and self.token_text is not None:
            logprobs = []  # asked for: every chunk carries its tokens' entries, none for the last one
        self.chunks.put_nowait(Chunk(text, finish, state["prompt"], state["completion"], error, state["cached"],
                                     logprobs))


class StreamError(RuntimeError):
    """vLLM sent an error event in the middle of a stream."""
