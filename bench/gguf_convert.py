"""Convert a model directory to GGUF with llama.cpp's own converter (convert_hf_to_gguf.py), for llama-server.

    .venv/bin/python bench/gguf_convert.py MODEL_DIR OUT.gguf [--outtype f16|f32|q8_0|bf16]

The converter ships with llama.cpp's sources (bench/peers_setup.sh puts them under /work/.cache/bench).
It recognises a byte-level BPE tokenizer by hashing what its pre-tokenizer does to a test text, and refuses
one it has no entry for. The demo models' tokenizer is trained locally, so it has none: this step maps such
a tokenizer to GPT-2's byte-level pre-tokenizer ("gpt-2"), which is exactly what the demos' tokenizer uses
(tokenizers' ByteLevel pre-tokenizer without a prefix space, as GPT-2's). A tokenizer the converter knows
(a real model's) converts as it is: the mapping applies only where the converter would refuse.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

LLAMA_CPP = Path(os.environ.get("BENCH_PEERS_HOME", "/work/.cache/bench")) / "llama.cpp"
log = logging.getLogger("gguf_convert")


def convert(model_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """Write `out` from `model_dir` unless it is already there; return its path."""
    if out.is_file() and out.stat().st_size > 0:
        return out
    import subprocess

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    cmd = [sys.executable, __file__, str(model_dir), str(partial), "--outtype", outtype]
    subprocess.run(cmd, check=True, env={**os.environ, "NO_LOCAL_GGUF": ""})
    partial.rename(out)
    return out


def _run_converter(model_dir: Path, out: Path, outtype: str) -> None:
    sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))  # the converter's own gguf package, not PyPI's
    sys.path.insert(0, str(LLAMA_CPP))
    import convert_hf_to_gguf  # noqa: F401  (registers the model classes)
    from conversion.base import TextModel

    recognised = TextModel.get_vocab_base_pre

    def base_pre_or_gpt2(self, tokenizer) -> str:
        try:
            return recognised(self, tokenizer)
        except NotImplementedError:
            log.warning("pre-tokenizer not recognised (a locally trained tokenizer): mapped to GPT-2's byte-level one")
            return "gpt-2"

    TextModel.get_vocab_base_pre = base_pre_or_gpt2
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", str(out), "--outtype", outtype]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--outtype", default="f16", choices=["f16", "f32", "bf16", "q8_0"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    _run_converter(args.model_dir, args.out, args.outtype)
