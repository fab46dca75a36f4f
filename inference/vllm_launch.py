"""`python -m inference.vllm_launch --report FILE -- VLLM_ARGS...`: one deployment's vLLM engine, as started by the web process.

By the time this runs, sitecustomize (inference/vllm_site) has installed the egress guard; this writes what the
interpreter really has (inference.vllm_guard.report) for the web process to record, then runs vLLM's OpenAI API
server. stdin is a pipe from the web process: when it closes (the web process ended, however it ended) the
engine's whole process group is stopped, so no EngineCore outlives the appliance that started it.
"""
import argparse
import os
import signal
import sys
import threading
import time

from inference.vllm_guard import write_report

STOP_GRACE_S = 5


def stop_with_parent() -> None:
    """Stop this process group once stdin, the web process's end of the pipe, closes."""
    while sys.stdin.buffer.read(4096):
        pass
    os.killpg(os.getpgrp(), signal.SIGTERM)
    time.sleep(STOP_GRACE_S)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", required=True, help="where to write the interpreter's guard and telemetry report")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    write_report(args.report)
    threading.Thread(target=stop_with_parent, name="stop-with-parent", daemon=True).start()
    from vllm.entrypoints.launchers.api_server.entry import main as serve

    sys.argv = ["vllm-api-server", *[a for a in args.vllm_args if a != "--"]]
    serve()


if __name__ == "__main__":
    main()
