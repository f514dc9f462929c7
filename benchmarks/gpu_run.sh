#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md, for a session lent a GPU machine: one part per call (each well
# under 10 minutes on an H100), everything printed and kept in OUT/PART.txt.
#
#   bash benchmarks/gpu_run.sh PART [OUT]
#
#   tests   the gpu-marked tests: attention backends against SDPA, no CUDA synchronisation in a step
#   7b      Mistral 7B v0.3 at seq 8192: tailor and transformers + PEFT side by side, then tailor's blocks compiled
#   long    Mistral 7B v0.3 at seq 32768, and the loss's memory at 32768 tokens x 131072 vocabulary
#   nemo    Nemo 12B at seq 32768 on one GPU
#
# The GPU machine has no mistral-common (the tests' tiny models use its tokenizers): carry it as wheels in .whl
# (the download command is in RESULTS.md); they are installed here when present. The commit is not known on that
# machine (no .git travels): note it from where the call was made.
set -uo pipefail
part=${1:?which part: tests, 7b, long or nemo}
out=${2:-${OUT:-benchmarks/out}}
mkdir -p "$out"
log="$out/$part.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee "$log"
bench() { echo "+ benchmarks/train_throughput.py $*" | tee -a "$log"; python3 benchmarks/train_throughput.py "$@" 2>&1 | tee -a "$log"; }

case $part in
    tests) python3 -m pytest -q -m gpu -rs tests 2>&1 | tee -a "$log" ;;
    7b) bench --arch mistral-7b --seq-len 8192 --steps 10
        bench --arch mistral-7b --seq-len 8192 --steps 10 --compile --no-hf ;;
    long) bench --arch mistral-7b --seq-len 32768 --steps 5 --no-hf
          bench --arch nemo-12b --seq-len 32768 --loss-memory ;;
    nemo) bench --arch nemo-12b --seq-len 32768 --steps 3 --no-hf ;;
    *) echo "unknown part '$part': tests, 7b, long or nemo" >&2; exit 2 ;;
esac
