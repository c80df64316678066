import sys, time, resource, torch
torch.set_num_threads(int(sys.argv[2]))
from lookahead.kernels import cpu; cpu.load()
from lookahead.models import LlamaForLookahead
t = time.perf_counter(); m = LlamaForLookahead.from_pretrained(sys.argv[1]); dt = time.perf_counter() - t
print(f"load {dt:.2f} s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1e6:.2f} GB")
