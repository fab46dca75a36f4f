"""Measure import throughput: copy+hash of a model directory, and GGUF conversion, with the importer's own code.

    .venv/bin/python bench/import_throughput.py [--gguf FILE] [--dir DIR] [--repeats 3]

copy+hash: appliance.modelfiles.copy_and_hash (what the worker runs for a Hugging Face directory) copies DIR
(default: the bundled GGUF's converted copy, written first) into a temporary store on the same file system,
hashing as it goes, fsync included. GGUF: appliance.gguf_import.hash_file then the conversion child
(`python -m appliance.gguf_convert`, dequantizing into bf16 safetensors) on FILE (default: the bundled
SmolLM2 GGUF). Prints MB/s of each (median of --repeats, MB of the source read) and writes
bench/out/import-throughput-<time>.json. Not part of `make test`; the page cache is warm after the first
repeat, so the figures are the CPU's and the disk's write path, not a cold read.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")

import django  # noqa: E402

django.setup()  # the importer's modules read the registry's models

from appliance import bundled  # noqa: E402
from appliance.gguf_import import hash_file  # noqa: E402
from appliance.modelfiles import copy_and_hash, tree_size  # noqa: E402

OUT = ROOT / "bench" / "out"


def child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def convert(gguf: Path, out: Path) -> tuple[float, float]:
    """Run the conversion child as the worker does; return its wall time and its CPU time in seconds.

    The CPU time is the figure that does not depend on what else the machine runs (a shared box's load
    stretches the wall time, not the work)."""
    started, cpu = time.perf_counter(), child_cpu_s()
    subprocess.run([sys.executable, "-m", "appliance.gguf_convert", str(gguf), str(out)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    return time.perf_counter() - started, child_cpu_s() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gguf = args.gguf or bundled.fetch()
    gguf_mb = gguf.stat().st_size / 1e6
    with tempfile.TemporaryDirectory(prefix="import-bench-", dir=ROOT / "var" if (ROOT / "var").is_dir() else None) as tmp:
        tmp = Path(tmp)
        hashes, conversions, conversion_cpu = [], [], []
        for i in range(args.repeats):
            started = time.perf_counter()
            hash_file(gguf, lambda done, total: None)
            hashes.append(gguf_mb / (time.perf_counter() - started))
            wall, cpu = convert(gguf, tmp / f"converted-{i}")
            conversions.append(gguf_mb / wall)
            conversion_cpu.append(cpu)
            if i:
                shutil.rmtree(tmp / f"converted-{i}")
        source = args.dir or tmp / "converted-0"
        size_mb = tree_size(source) / 1e6
        copies = []
        for i in range(args.repeats):
            started = time.perf_counter()
            copy_and_hash(source, tmp / f"copy-{i}")
            copies.append(size_mb / (time.perf_counter() - started))
            shutil.rmtree(tmp / f"copy-{i}")
    result = {
        "gguf": str(gguf), "gguf_mb": round(gguf_mb, 1), "dir": str(args.dir or "(the GGUF's converted copy)"),
        "dir_mb": round(size_mb, 1), "repeats": args.repeats, "cpus": os.cpu_count(),
        "copy_and_hash_mb_s": round(statistics.median(copies), 1),
        "gguf_hash_mb_s": round(statistics.median(hashes), 1),
        "gguf_convert_mb_s": round(statistics.median(conversions), 1),
        "gguf_convert_s": round(gguf_mb / statistics.median(conversions), 1),
        "gguf_convert_cpu_s": round(statistics.median(conversion_cpu), 1),
        "load_average": os.getloadavg(),
        "all": {"copy_and_hash": copies, "gguf_hash": hashes, "gguf_convert": conversions,
                "gguf_convert_cpu_s": conversion_cpu},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"import-throughput-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"copy+hash   {result['copy_and_hash_mb_s']:8.1f} MB/s  ({size_mb:.0f} MB directory)")
    print(f"GGUF hash   {result['gguf_hash_mb_s']:8.1f} MB/s  ({gguf_mb:.0f} MB file)")
    print(f"GGUF → bf16 {result['gguf_convert_mb_s']:8.1f} MB/s of GGUF read  ({result['gguf_convert_s']} s per file, "
          f"{result['gguf_convert_cpu_s']} CPU s; load average {result['load_average'][0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
