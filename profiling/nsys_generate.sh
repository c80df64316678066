#!/usr/bin/env bash
# Nsight Systems timeline of one `lookahead generate` run, with the NVTX ranges of the decode step
# (draft, verify, accept, compact, commit) on. Open the .nsys-rep in the Nsight Systems GUI.
set -euo pipefail
OUT=${OUT:-lookahead_generate}
LOOKAHEAD_NVTX=1 nsys profile -t cuda,nvtx --cuda-graph-trace=node -o "$OUT" --force-overwrite true \
  lookahead generate --model "${MODEL:-smollm2-135m-instruct}" --chat --max-new-tokens "${TOKENS:-128}" \
  --prompt "${PROMPT:-Summarize the plot of Hamlet in five sentences.}"
