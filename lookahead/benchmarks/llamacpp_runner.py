"""Run one system, ours or llama.cpp, on one GGUF file and write what it did as JSON: the worker of `lookahead
bench-llamacpp`, one process per system, round and thread count. llama.cpp (llama-cpp-python 0.3.36) lives in its own
venv without torch (`make llamacpp-venv`), so this file is run by path and imports the lookahead package only inside
the functions of our system:

    python lookahead/benchmarks/llamacpp_runner.py job.json result.json

job: {"system": "ours" | "llamacpp", "task": "generate" | "decode" | "logits" | "quantize", "gguf": path,
      "threads": int, ...task fields}
- generate: {"prompts": [[ids], ...], "max_new_tokens", "eos": [ids], "lookahead": bool (ours), "lookup_tokens": int,
  0 = plain (llama.cpp)} -> {"runs": [{"tokens" (EOS excluded), "seconds", "steps"}, ...], "system"}
- decode: {"tokens": n} -> plain greedy (time of n tokens - time of 1) / (n - 1), EOS never stopping it:
  {"ms_per_token", "load_s", "peak_rss_gb", "system"}
- logits: {"ids": [ids], "logits_path", "dequantized": bool, "dtype": "auto" | "fp32" | "bf16" (ours)} -> the logits of
  every position, teacher-forced, written to logits_path as float32 .npy [T, V]; {"system"}
- quantize (llama.cpp): {"dst", "type"} -> the file at dst, requantized from gguf where that is quantized already
"""

from __future__ import annotations

import json
import resource
import sys
import time

FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}  # llama_ftype
LLAMACPP_VERSION = "llama-cpp-python 0.3.36"
PROMPT_IDS = [1] * 8  # the warm-up's and the decode task's prompt: decode speed does not depend on the ids


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _until_eos(tokens: list[int], eos: list[int]) -> list[int]:
    """The tokens before the first EOS (ours returns it, llama.cpp's loop below stops before it)."""
    cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:cut]


# ours: the main venv (torch and the lookahead package)

def _ours_model(job: dict, dequantized: bool = False, dtype: str = "auto"):
    import torch

    from lookahead.models import LlamaForLookahead

    torch.set_num_threads(job["threads"])
    if dtype == "auto":  # quantized, activations as `quantization="auto"` picks them (docs/gguf.md)
        return LlamaForLookahead.from_pretrained(job["gguf"], device="cpu")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    return LlamaForLookahead.from_pretrained(job["gguf"], dtype=torch_dtype, device="cpu",
                                             quantization=None if dequantized else "gguf")


def _ours_system(model) -> str:
    from lookahead.models.gguf import describe

    return f"ours ({describe(model)})"


def ours_generate(job: dict) -> dict:
    import torch

    model = _ours_model(job)
    lookahead, eos = bool(job["lookahead"]), job["eos"]
    with torch.inference_mode():
        # allocates the cache and measures the verify cost prior; then the trie forgets the warm-up's tokens
        model.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=8, lookahead=lookahead)
        model.state.forget_drafting()
        runs = []
        for prompt in job["prompts"]:  # the trie keeps every earlier prompt's output (the model's default)
            ids = torch.tensor([prompt])
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=job["max_new_tokens"], lookahead=lookahead, eos_token_id=eos,
                                 return_dict_in_generate=True)
            seconds = time.perf_counter() - start
            runs.append({"tokens": _until_eos(out.sequences[0, len(prompt):].tolist(), eos), "seconds": seconds,
                         "steps": out.stats.steps})
    return {"system": _ours_system(model), "runs": runs}


def ours_decode(job: dict) -> dict:
    import torch

    start = time.perf_counter()
    model = _ours_model(job)
    load_s = time.perf_counter() - start
    ids = torch.tensor([PROMPT_IDS])

    def timed(n: int) -> float:
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, lookahead=False, eos_token_id=[])
        return time.perf_counter() - t

    with torch.inference_mode():
        timed(8)  # warm-up: the RoPE table, the first pages of the map
        per_token = (timed(job["tokens"]) - timed(1)) / (job["tokens"] - 1)
    return {"system": _ours_system(model), "ms_per_token": 1e3 * per_token, "load_s": load_s,
            "peak_rss_gb": peak_rss_gb()}


def ours_logits(job: dict) -> dict:
    import numpy as np
    import torch

    model = _ours_model(job, job.get("dequantized", False), job.get("dtype", "auto"))
    with torch.inference_mode():
        logits = model(torch.tensor([job["ids"]])).logits[0]  # (T, V)
    np.save(job["logits_path"], logits.float().numpy())
    return {"system": _ours_system(model)}


# llama.cpp: the .venv-llamacpp venv (llama_cpp and numpy)

def _llama(job: dict, n_ctx: int, **kwargs):
    from llama_cpp import Llama

    return Llama(model_path=job["gguf"], n_threads=job["threads"], n_threads_batch=job["threads"], n_ctx=n_ctx,
                 verbose=False, **kwargs)


def llamacpp_generate(job: dict) -> dict:
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    class CountedLookup(LlamaPromptLookupDecoding):
        """Prompt lookup that counts its calls: generate asks for a draft once after every forward pass."""
        calls = 0

        def __call__(self, input_ids, *args, **kwargs):
            self.calls += 1
            return super().__call__(input_ids, *args, **kwargs)

    lookup = CountedLookup(num_pred_tokens=job["lookup_tokens"]) if job["lookup_tokens"] else None
    longest = max(map(len, job["prompts"]))
    # with a draft model llama-cpp-python keeps every position's logits but sizes its scores buffer by the
    # logits_all argument (n_batch rows when False), so a prompt longer than n_batch would fail in eval
    llm = _llama(job, longest + job["max_new_tokens"] + job["lookup_tokens"] + 16, draft_model=lookup,
                 logits_all=lookup is not None)
    eos = set(job["eos"])

    def run(prompt: list[int], max_new: int) -> tuple[list[int], int]:
        llm.reset()  # no KV reuse of an earlier prompt's prefix: ours starts every prompt from nothing too
        calls = lookup.calls if lookup else 0
        out: list[int] = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
            if token in eos:
                break
            out.append(token)
            if len(out) == max_new:
                break
        # forward passes: the prefill plus one per draft asked for (plain: one per token)
        steps = (lookup.calls - calls + 1) if lookup else len(out) + (len(out) < max_new)
        return out, steps

    run(PROMPT_IDS, 8)
    runs = []
    for prompt in job["prompts"]:
        start = time.perf_counter()
        tokens, steps = run(prompt, job["max_new_tokens"])
        runs.append({"tokens": tokens, "seconds": time.perf_counter() - start, "steps": steps})
    kind = f"prompt lookup, {job['lookup_tokens']} tokens" if lookup else "plain"
    return {"system": f"llama.cpp ({LLAMACPP_VERSION}, {kind})", "runs": runs}


def llamacpp_decode(job: dict) -> dict:
    import numpy as np

    start = time.perf_counter()
    llm = _llama(job, 512)
    load_s = time.perf_counter() - start
    eos = llm.token_eos()

    def timed(n: int) -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(PROMPT_IDS)
        for _ in range(n):
            logits = np.array(llm.scores[llm.n_tokens - 1])
            logits[eos] = -np.inf
            llm.eval([int(logits.argmax())])
        return time.perf_counter() - t

    timed(8)
    per_token = (timed(job["tokens"]) - timed(1)) / (job["tokens"] - 1)
    return {"system": f"llama.cpp ({LLAMACPP_VERSION})", "ms_per_token": 1e3 * per_token, "load_s": load_s,
            "peak_rss_gb": peak_rss_gb()}


def llamacpp_logits(job: dict) -> dict:
    import numpy as np

    ids = job["ids"]
    llm = _llama(job, len(ids) + 8, logits_all=True)
    llm.eval(ids)
    np.save(job["logits_path"], np.asarray(llm.scores[:len(ids)], dtype=np.float32))
    return {"system": f"llama.cpp ({LLAMACPP_VERSION})"}


def llamacpp_quantize(job: dict) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[job["type"]]
    params.nthread = job["threads"]
    params.allow_requantize = True  # the shipped SmolLM2 is Q4_1 already: llama.cpp dequantizes, then quantizes
    rc = llama_cpp.llama_model_quantize(job["gguf"].encode(), job["dst"].encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc} for {job['gguf']} -> {job['dst']}")
    return {"system": f"llama.cpp ({LLAMACPP_VERSION})"}


TASKS = {("ours", "generate"): ours_generate, ("ours", "decode"): ours_decode, ("ours", "logits"): ours_logits,
         ("llamacpp", "generate"): llamacpp_generate, ("llamacpp", "decode"): llamacpp_decode,
         ("llamacpp", "logits"): llamacpp_logits, ("llamacpp", "quantize"): llamacpp_quantize}


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python lookahead/benchmarks/llamacpp_runner.py job.json result.json")
    with open(argv[0]) as f:
        job = json.load(f)
    result = TASKS[job["system"], job["task"]](job)
    with open(argv[1], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
