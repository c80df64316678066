"""Run vLLM on token-id prompts and write what it did as JSON: the script the vLLM tests and `lookahead bench-vllm`
start with the vLLM environment's python (vLLM lives in its own venv: it pins its own torch).

    python -m lookahead.benchmarks.vllm_runner job.json result.json

job: {"model": HF dir, "max_tokens": int, "repeats": int, "max_model_len": int, "ignore_eos": bool,
      "configs": [{"name": str, "speculative_config": dict | null}],
      "groups": [[[prompt token ids, ...] (one LLM.generate call), ...], ...]}
Every (config, group, repeat) gets a fresh LLM, so what a drafter learns (our trie, suffix's cache) carries over
from one batch of a group to the next but never into another group or repeat.
result: {"configs": [{"name", "load_s", "groups": [[{"tokens": [[ids], ...], "wall_s", "cpu_s": [per repeat],
         "generated",
         "drafts", "draft_tokens", "accepted", "proposer_host_s", "proposer_steps"}, ...], ...]}]}
Tokens and counters (vLLM's spec-decode metrics and the proposer's own) are the first repeat's; a repeat that
gives other tokens is an error.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

# what vLLM's CPU build needs to run a small fp32 model on a shared 2-core machine: one OpenMP thread without
# pinning (2 threads, or numba's default pool, ran at ~0.7 tok/s here), a 2 GiB KV cache, the engine in-process.
# They must be in the environment before torch is imported, so before `python -m lookahead...` starts (the
# lookahead package imports torch): main() restarts the interpreter with them when they are missing.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "NUMBA_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
COUNTERS = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
            "vllm:spec_decode_num_accepted_tokens": "accepted"}


class FixedDraftProposer:
    """A measuring proposer: K copies of the row's last token every step, so a step verifies exactly K draft
    tokens per row (what `lookahead bench-vllm --step-cost` times; the tokens are almost never accepted)."""

    last: FixedDraftProposer | None = None

    def __init__(self, vllm_config):
        from lookahead.integrations.vllm import ProposerStats

        self.k = vllm_config.speculative_config.num_speculative_tokens
        self.stats = ProposerStats()
        FixedDraftProposer.last = self

    def load_model(self, model) -> None:
        pass

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):
        start = time.perf_counter()
        drafts = [[int(s[-1])] * self.k if len(s) else [] for s in sampled_token_ids]
        self.stats.host_s.append(time.perf_counter() - start)
        return drafts


def _counters(llm) -> dict[str, int]:
    out = dict.fromkeys(COUNTERS.values(), 0)
    for metric in llm.get_metrics():
        if metric.name in COUNTERS:
            out[COUNTERS[metric.name]] += int(metric.value)
    return out


def _skip_llvmlite_in_kernel_rebinding() -> None:
    """vllm-cpu 0.32.0 scans every loaded module's globals when it rebinds its Triton kernel overrides and crashes
    on llvmlite's ctypes wrappers (`'_lib_fn_wrapper' object has no attribute 'get'`) once numba is loaded, which
    the `ngram` method does. The scan never needs llvmlite or numba: hide them from it."""
    from vllm.triton_utils import dispatcher

    rebind = dispatcher._rebind_kernels

    def without_llvmlite(pairs):
        hidden = {name: sys.modules.pop(name) for name in list(sys.modules)
                  if name.split(".")[0] in ("llvmlite", "numba")}
        try:
            return rebind(pairs)
        finally:
            sys.modules.update(hidden)

    dispatcher._rebind_kernels = without_llvmlite


def run(job: dict) -> dict:
    _skip_llvmlite_in_kernel_rebinding()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from lookahead.integrations.vllm import LookaheadProposer

    proposers = (LookaheadProposer, FixedDraftProposer)

    params = SamplingParams(temperature=0.0, max_tokens=int(job["max_tokens"]),
                            ignore_eos=bool(job.get("ignore_eos")))
    results = []
    for config in job["configs"]:
        groups, load_s = [], []
        for group in job["groups"]:
            records: list[dict] = []
            for repeat in range(int(job.get("repeats", 1))):
                for cls in proposers:
                    cls.last = None
                start = time.perf_counter()
                llm = LLM(model=job["model"], dtype=job.get("dtype", "float32"), max_model_len=int(job.get("max_model_len", 2048)),
                          enforce_eager=True, disable_log_stats=False,
                          speculative_config=config.get("speculative_config"))
                load_s.append(time.perf_counter() - start)
                proposer = next((cls.last for cls in proposers if cls.last is not None), None)
                for i, prompts in enumerate(group):
                    before = _counters(llm)
                    host_before = len(proposer.stats.host_s) if proposer is not None else 0
                    start, cpu = time.perf_counter(), time.process_time()
                    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                           use_tqdm=False)
                    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                    ids = [list(o.outputs[0].token_ids) for o in outputs]
                    if repeat == 0:
                        after = _counters(llm)
                        host = proposer.stats.host_s[host_before:] if proposer is not None else []
                        records.append({"tokens": ids, "wall_s": [wall], "cpu_s": [cpu],
                                        "generated": sum(map(len, ids)),
                                        **{k: after[k] - before[k] for k in after},
                                        "proposer_host_s": sum(host), "proposer_steps": len(host)})
                    elif ids != records[i]["tokens"]:
                        raise RuntimeError(f"{config['name']}: a repeat of the same greedy batch gave other tokens")
                    else:
                        records[i]["wall_s"].append(wall)
                        records[i]["cpu_s"].append(cpu)
                del llm
                gc.collect()
            groups.append(records)
        results.append({"name": config["name"], "load_s": load_s, "groups": groups})
    return {"configs": results}


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m lookahead.benchmarks.vllm_runner job.json result.json")
    if any(os.environ.get(key) is None for key in CPU_ENV):  # too late for torch's OpenMP pool: start again
        os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *argv], {**CPU_ENV, **os.environ})
    with open(argv[0]) as f:
        job = json.load(f)
    result = run(job)
    with open(argv[1], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
