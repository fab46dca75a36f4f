"""Run by every interpreter of a vLLM engine before its own code (this folder is first on its PYTHONPATH)."""
import sys
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # the appliance's checkout: audit and inference

from inference.vllm_guard import guard_this_interpreter  # noqa: E402

guard_this_interpreter()
