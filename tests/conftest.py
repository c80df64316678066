import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter, which must be chosen before anything imports triton
# (importing torch does not); with one they are compiled for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct in fp32 on CPU, with its tokenizer (converted once per cache dir)."""
    from transformers import AutoTokenizer

    from lookahead.models import LlamaForLookahead, resolve_checkpoint

    model = LlamaForLookahead.from_pretrained("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint("smollm2-135m-instruct"))
    return model, tokenizer
