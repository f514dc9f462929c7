#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md in ONE device call of at most 8 minutes: every part runs under its
# own `timeout` and writes OUT/PART.txt as it goes, so a part that is killed or fails loses only itself.
#
#   bash benchmarks/gpu_run.sh wheels            # here, once, before the call: the wheels the GPU image lacks, in .whl/
#   bash benchmarks/gpu_run.sh [OUT]             # on the GPU machine, carrying .whl: every part, in the order below
#   GPU_RUN_DRY=1 bash benchmarks/gpu_run.sh OUT # every part's command at tiny sizes on a CPU (tests/benchmarks/)
#
#   part     limit  what
#   tests     75 s  the gpu-marked tests: attention backends against SDPA, no CUDA synchronisation in a step
#   7b       130 s  Mistral 7B v0.3 at seq 8192: tailor, transformers + PEFT as its users run it, and HF made equal
#   long      50 s  Mistral 7B v0.3 at seq 32768
#   nemo      65 s  Nemo 12B at seq 32768 on one GPU
#   nf4       55 s  configs/mistral-7b-v0.3-qlora-16gb.yaml's model: NF4 weights, LoRA rank 64, seq 8192
#   profile   40 s  the profiler's table of one step of 7B at seq 8192 (8 layers), by CUDA time
#
# Each benchmark prints the measured peak beside the memory estimate and the trace of the same setup. OUT gets summary.txt
# (the machine, each part's exit status and seconds) and one file per part: 7 files, under the 8 a call brings back.
# The commit is not known on that machine (no .git travels): note it from where the call was made.
set -uo pipefail

# What the GPU image lacks (mistral-common for the tests' tokenizers, torchao for NF4), pinned, with their own needs.
WHEELS="mistral-common==1.13.1 pydantic==2.13.4 pydantic-core==2.46.4 pydantic-extra-types==2.11.1 pycountry==26.2.16 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0 annotated-types==0.7.0 typing-inspection==0.4.2 torchao==0.18.0"

if [[ ${1:-} == wheels ]]; then
    # shellcheck disable=SC2086
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
fi

out=${1:-${OUT:-benchmarks/out}}
mkdir -p "$out"
summary="$out/summary.txt"
budget=470 # seconds for all parts: the call's 8 minutes, less the install and the start of python
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD

if [[ ${GPU_RUN_DRY:-} == 1 ]]; then
    # the same commands at the sizes of a CPU smoke test
    b7=(--arch tiny) nemo=(--arch tiny) seq=256 long=256 steps=(--steps 1 --warmup 1) few=(--steps 1 --warmup 1)
    profile_layers=()
else
    b7=(--arch mistral-7b) nemo=(--arch nemo-12b) seq=8192 long=32768 steps=(--steps 5 --warmup 2)
    few=(--steps 2 --warmup 1) profile_layers=(--layers 8)
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl 2>&1 | tee -a "$summary"
        export PYTHONPATH=/tmp/site:$PWD
    fi
fi

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee -a "$summary"

# part NAME SECONDS COMMAND...: COMMAND under `timeout`, capped by what is left of the budget, into OUT/NAME.txt
part() {
    local name=$1 limit=$2 left=$((budget - SECONDS)) start=$SECONDS status
    shift 2
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "part $name: not run, the call's budget is spent" | tee -a "$summary"
        return
    fi
    echo "+ $* (limit ${limit} s)" >"$out/$name.txt"
    timeout --kill-after=5 "$limit" "$@" >>"$out/$name.txt" 2>&1
    status=$?
    ((status == 124 || status == 137)) && echo "killed at its limit of ${limit} s" >>"$out/$name.txt"
    echo "part $name: exit $status after $((SECONDS - start)) s" | tee -a "$summary"
}
bench=(python3 benchmarks/train_throughput.py)

part tests 75 python3 -m pytest -q -m gpu -rs -p no:cacheprovider tests
part 7b 130 "${bench[@]}" "${b7[@]}" --seq-len $seq "${steps[@]}" --hf default equal
part long 50 "${bench[@]}" "${b7[@]}" --seq-len $long "${few[@]}" --no-hf
part nemo 65 "${bench[@]}" "${nemo[@]}" --seq-len $long "${few[@]}" --no-hf
part nf4 55 "${bench[@]}" "${b7[@]}" --seq-len $seq "${few[@]}" --quantize nf4 --rank 64 --no-hf
part profile 40 "${bench[@]}" "${b7[@]}" "${profile_layers[@]}" --seq-len $seq "${few[@]}" --profile --no-hf
echo "done after $SECONDS s" | tee -a "$summary"
