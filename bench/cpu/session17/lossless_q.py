# lookahead == the quantized model's own plain decoding, per GGUF file: the 1B-shaped random files on prompts with
# repeats (so that drafts are proposed), SmolLM2's Q4_K_M requantization on Spec-Bench first turns
import sys, torch
from transformers import AutoTokenizer
from lookahead.models import LlamaForLookahead
from lookahead.models.checkpoint import resolve_checkpoint
from lookahead.data import round_robin, read_first_turns, spec_bench_path, encode_prompt
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
for path in sys.argv[1:]:
    m = LlamaForLookahead.from_pretrained(path)
    if "SmolLM2" in path:
        tok = AutoTokenizer.from_pretrained(resolve_checkpoint("smollm2-135m-instruct"))
        prompts = [encode_prompt(tok, t, True) for _, t in round_robin(read_first_turns(spec_bench_path()), 1)[:13]]
        n_new = 128
    else:
        prompts = []
        for i in range(6):
            base = torch.randint(2, 40000, (9,), generator=g).tolist()
            prompts.append(torch.tensor([[1] + base * 5]))
        n_new = 32
    same = 0
    for ids in prompts:
        a = m.generate(ids, max_new_tokens=n_new, lookahead=False)
        b = m.generate(ids, max_new_tokens=n_new, lookahead=True)
        same += int(torch.equal(a, b))
    print(f"{path.split('/')[-1]}: lookahead == plain on {same}/{len(prompts)} prompts x {n_new} tokens", flush=True)
