"""Static KV cache: one preallocated buffer for every layer, written by index at explicit slots."""

from __future__ import annotations

import torch


class KVCache:
    """buffer [L, 2, B, Hkv, S, D] (layer, k/v, row, kv head, slot, head dim); lens [B] committed slots per row.

    Slots >= lens[b] hold scratch (the draft rows of the step in flight, or stale values); they are only read
    under a mask, and the buffer starts zeroed so that stale values are always finite.
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.buffer = torch.zeros(num_layers, 2, batch, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.lens = torch.zeros(batch, dtype=torch.long, device=device)
        self.batch, self.max_len = batch, max_len  # rows, and slots per row

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows [start, stop) as a cache of their own: views of this buffer and lengths, so a forward over them
        writes and reads only those rows (a server prefills one row while the others wait)."""
        view = KVCache.__new__(KVCache)
        view.buffer, view.lens = self.buffer[:, :, start:stop], self.lens[start:stop]  # (L, 2, n, Hkv, S, D), (n,)
        view.batch, view.max_len = stop - start, self.max_len
        return view
