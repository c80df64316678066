"""model_memory_bytes: each weight storage once (tied weights, views), plus any prepacked copy a module holds."""

import mmap

import torch

from lookahead.serve.memory import model_memory_bytes, rss_bytes, trim_allocator
from tests.helpers import make_tiny_llama


def test_weights_count_each_storage_once_and_a_packed_copy():
    model = make_tiny_llama(0)
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    weights = model_memory_bytes(model)
    assert weights == sum(params.values()) + buffers
    tied = make_tiny_llama(0, tie_word_embeddings=True)
    assert model_memory_bytes(tied) == weights - model.output.weight.nbytes  # the LM head shares the embedding
    linear = model.layers[0].feed_forward.w2
    linear.packed = linear.weight.detach().t().contiguous()  # what a backend keeps beside the weight
    assert model_memory_bytes(model) == weights + linear.weight.nbytes
    linear.packed = (linear.packed, linear.weight)  # the parameter itself is not counted twice
    assert model_memory_bytes(model) == weights + linear.weight.nbytes


def test_process_resident_size_and_trimming():
    rss, peak = rss_bytes()
    assert 0 < rss <= peak
    # Fresh anonymous pages, touched one by one: a tensor could reuse memory the allocator already holds (the
    # resident size would not move), an mmap of its own cannot.
    block = mmap.mmap(-1, 64 << 20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    grown, grown_peak = rss_bytes()
    assert grown >= rss + (48 << 20) and grown_peak >= grown
    block.close()
    assert rss_bytes()[0] <= grown - (48 << 20)  # unmapped: the pages left the resident set
    freed = torch.ones(64 << 20, dtype=torch.uint8)
    del freed
    assert isinstance(trim_allocator(), bool)
