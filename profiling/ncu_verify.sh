#!/usr/bin/env bash
# Nsight Compute of the three kernels of verify steps (tree attention, acceptance, compaction), clocks
# unlocked so the numbers match what users see. Skips the first steps (warm-up) and captures a few.
set -euo pipefail
OUT=${OUT:-lookahead_verify}
ncu --clock-control none --set full -k 'regex:_tree_attention_kernel|_accept_longest_path_kernel|_compact_kv_kernel' \
  --launch-skip "${SKIP:-300}" --launch-count "${COUNT:-30}" -o "$OUT" -f \
  lookahead generate --model "${MODEL:-smollm2-135m-instruct}" --chat --max-new-tokens 64 \
  --prompt "${PROMPT:-Summarize the plot of Hamlet in five sentences.}"
