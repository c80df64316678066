"""End-to-end on the embedded SmolLM2-135M-Instruct (fp32, CPU): parity with transformers, bad input."""

import pytest
import torch

from tests.helpers import chat_ids, spec_bench_prompts


@pytest.mark.slow
def test_greedy_equals_transformers_on_spec_bench(smollm2):
    from transformers import AutoModelForCausalLM

    from lookahead.models import resolve_checkpoint

    model, tokenizer = smollm2
    hf = AutoModelForCausalLM.from_pretrained(resolve_checkpoint("smollm2-135m-instruct"), dtype=torch.float32).eval()
    prompts = [p for _, p in spec_bench_prompts(1)][:6]
    for text in prompts:
        ids = chat_ids(tokenizer, text)
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)
        got = model.generate(ids, max_new_tokens=64, lookahead=False)
        assert got.tolist() == expected.tolist(), text


def test_generate_rejects_bad_input(smollm2):
    model, _ = smollm2
    vocab = model.config.vocab_size
    ok = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(torch.tensor([[1, vocab]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model.generate(ok, max_new_tokens=model.config.max_position_embeddings)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ok, max_new_tokens=0)
    with pytest.raises(ValueError, match="integer tensor"):
        model.generate(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ok, attention_mask=torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="lookahead must be"):
        model.generate(ok, lookahead="yes")
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(ok, references=["some text"])


def test_plain_stats_and_streamer(smollm2):
    model, tokenizer = smollm2
    ids = chat_ids(tokenizer, "Name three colours.")

    class Collect:
        def __init__(self):
            self.chunks = []
            self.ended = False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    out = model.generate(ids, max_new_tokens=12, lookahead=False, streamer=streamer, return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    assert streamer.ended and streamer.chunks[0] == ids[0].tolist()
    assert sum(streamer.chunks[1:], []) == new
    assert out.stats.accepted_per_step == 1.0 and out.stats.steps == len(new)
