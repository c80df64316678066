"""A small CUDA workload of the three kernels for compute-sanitizer (memcheck, racecheck, initcheck):

    compute-sanitizer --tool memcheck python profiling/sanitize_kernels.py
    compute-sanitizer --tool racecheck python profiling/sanitize_kernels.py

Shapes cover prefix tails, several draft tiles, grouped-query packing, prefix splits, batches and head dims
padded to a power of two (80, 96: the masked lanes must never be read or written); each output is checked
against the torch reference so that a kernel that writes nothing cannot pass.
"""

import torch

from lookahead import kernels
from lookahead.drafting.tree import build_draft, pack_ragged
from lookahead.kernels import reference
from lookahead.kernels.triton.tree_attention import launch as launch_attention


def random_tree(B: int, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(parents [B, T], tree_mask [B, T, T]) of random trees of T nodes, laid out as the decode step does."""
    drafts = [build_draft(0, [0] * (T - 1), [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, T)])
              for _ in range(B)]
    batch = pack_ragged([[]] * len(drafts), drafts, "cpu", pad=True).tree  # padded to a bucket: keep the first T nodes (T need not be a bucket)
    return batch.parents[:, :T].contiguous(), batch.tree_mask[:, :T, :T].contiguous()


def main() -> None:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for B, prefix, T, hq, hkv, D, splits in ((1, 37, 7, 3, 1, 64, None), (2, 300, 64, 4, 4, 128, None),
                                                 (1, 2048, 16, 8, 2, 128, 4), (3, 1, 100, 2, 1, 64, None),
                                                 (2, 300, 7, 6, 2, 96, 3), (1, 37, 16, 4, 4, 80, None)):
            S = prefix + T + 5
            q = torch.randn(B, T, hq, D, generator=g).to("cuda", dtype)
            k = torch.randn(B, hkv, S, D, generator=g).to("cuda", dtype)
            v = torch.randn(B, hkv, S, D, generator=g).to("cuda", dtype)
            lens = torch.tensor([max(0, prefix - 3 * b) for b in range(B)], device="cuda")
            _, mask = random_tree(B, T, g)
            mask = mask.cuda()
            out = launch_attention(q, k, v, lens, mask, num_splits=splits)
            ref = reference.tree_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), lens.cpu(), mask.cpu())
            torch.testing.assert_close(out.float().cpu(), ref, atol=3e-2, rtol=3e-2)
    for B, T in ((1, 64), (4, 17), (2, 128)):
        parents, _ = random_tree(B, T, g)
        tokens = torch.randint(0, 3, (B, T), generator=g)
        targets = torch.randint(0, 3, (B, T), generator=g)
        path, num = kernels.accept_longest_path(tokens.cuda(), parents.cuda(), targets.cuda())
        ref_path, ref_num = reference.accept_longest_path(tokens, parents, targets)
        assert torch.equal(path.cpu(), ref_path) and torch.equal(num.cpu(), ref_num)
        cache = torch.randn(3, 2, B, 2, 300, 64, generator=g).to("cuda", torch.bfloat16)
        expected = cache.cpu().float()
        lens = torch.randint(0, 100, (B,), generator=g)
        reference.compact_kv(expected, lens, ref_path, ref_num)
        kernels.compact_kv(cache, lens.cuda(), path, num)
        assert torch.equal(cache.float().cpu(), expected)
    torch.cuda.synchronize()
    print("sanitize workload: all outputs match the references")


if __name__ == "__main__":
    main()
