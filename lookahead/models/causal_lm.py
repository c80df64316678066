"""The decoder-only transformer every family shares: embeddings, the decoder layers, the LM head, and the three
forwards (full, prefill, verify a draft tree, padded or ragged) over a static KV cache.

A family (llama.py, glm.py) says which `model_type`s it serves, its part of the config.json -> ModelConfig
translation and how checkpoint tensor names map onto ours; loading.py does the rest of loading, once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn as nn

from lookahead import kernels
from lookahead.models.cache import KVCache
from lookahead.models.config import ModelConfig, rope_inv_freq
from lookahead.models.layers import AttentionContext, Block, Embedding, Linear, RMSNorm

ROPE_BLOCK = 256  # the RoPE table is computed in blocks of this many positions (see CausalLM._rope_table)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V]


class CausalLM(nn.Module):
    """Decoder-only transformer with a static KV cache and draft-tree verification."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # What `generate` runs and what `state` holds: the engine installs both when it is imported (lookahead/__init__
    # imports it), so the model imports nothing of the engine or of drafting.
    run_generate: ClassVar[Callable]
    new_state: ClassVar[Callable]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.name_or_path = None
        self._rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # _rope_table: cos, sin [P, rot]
        self._no_tensor = torch.empty(0)  # _layer_weights' stand-in for an absent bias or norm
        self._weights_list: tuple | None = None  # _layer_weights' last answer and the (dtype, device) it was for
        self._exact = False  # set_exact
        self._state = None  # the engine's GenerationState, made at first use (`state`)

    @property
    def state(self):
        """What generation keeps on this model between calls (a `GenerationState`: trie, KV cache, CUDA graphs,
        cost curves, drafter calibration). The model only holds it: the engine owns its type (`new_state`)."""
        if self._state is None:
            self._state = type(self).new_state()
        return self._state

    @state.setter
    def state(self, state) -> None:
        self._state = state  # a fresh GenerationState (a server's first request sees a new process's state)

    @property
    def trie(self):
        """The token trie lookahead drafts from; persists across generate calls (assign a loaded one to warm up)."""
        return self.state.trie

    @trie.setter
    def trie(self, trie) -> None:
        self.state.set_trie(trie)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (a GGUF-quantized model's weights are uint8 blocks: its QuantEmbedding says)."""
        return getattr(self.tok_embeddings, "act_dtype", None) or self.tok_embeddings.weight.dtype

    @property
    def prefill_in_verify(self) -> bool:
        """Whether an engine prefills through verify chains (`verify_ragged`): on the C++ CPU path, where tree
        attention over the key sequence gives a prompt token the bits of a one-token step wherever chunks end, so
        a prefill at `add` and one spread over decode steps agree bit for bit."""
        return kernels.fused_decoder(self.tok_embeddings.weight)

    # ---- loading: the family hooks (loading.py's `Pretrained.from_pretrained` uses them) ---------------------
    @classmethod
    def family_config(cls, hf: dict) -> ModelConfig:
        """The family's part of config_from_hf: a config.json of one of its model_types -> ModelConfig."""
        raise NotImplementedError

    @classmethod
    def convert_state_dict(cls, sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Checkpoint tensor names -> ours (fusing q/k/v and gate/up)."""
        raise NotImplementedError

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        """A config.json dict -> ModelConfig; ValueError unless this class serves its model_type."""
        model_type = hf.get("model_type")
        if model_type not in cls.model_types:
            raise ValueError(f"{cls.__name__} serves model_type {', '.join(cls.model_types)}; this checkpoint is "
                             f"{model_type!r}. Use the matching class from lookahead.models.")
        return cls.family_config(hf)

    # ---- forward -----------------------------------------------------------------------------------------
    def _rope_table(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables [>= n, rot] for positions 0.., grown in blocks of ROPE_BLOCK positions. Every block is
        computed on a tensor of the same shape, so a position's values never depend on how far the table grew
        (a vectorised cos may round differently where a loop's tail falls)."""
        table = self._rope_tables
        if table is not None and (table[0].dtype != self.dtype or table[0].device != self.device):
            table = None
        have = 0 if table is None else table[0].shape[0]
        if have < n:
            blocks = [self._angles(torch.arange(p, p + ROPE_BLOCK, device=self.device))
                      for p in range(have, n, ROPE_BLOCK)]
            old = [] if table is None else [table]
            table = (torch.cat([t[0] for t in old] + [c for c, _ in blocks]),
                     torch.cat([t[1] for t in old] + [s for _, s in blocks]))
        self._rope_tables = table
        return table

    def _angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [..., rot] in the model's dtype of integer positions [...], laid out for the rotation."""
        freqs = positions[..., None].float() * self.inv_freq  # (..., rot/2)
        if self.config.rope_interleaved:
            freqs = freqs.repeat_interleave(2, dim=-1)
        else:
            freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)

    def _context(self, mode: str, positions: torch.Tensor, max_position: int, **fields) -> AttentionContext:
        """The attention context of tokens at positions [B, T] (all < max_position): cos/sin read off the RoPE
        table, so a position gets the same bits in a one-token step and in a verify step of any size."""
        cos, sin = self._rope_table(max_position)
        return AttentionContext(mode, cos[positions], sin[positions], **fields)

    def _run(self, input_ids: torch.Tensor, ctx: AttentionContext, pick: tuple | None = None) -> torch.Tensor:
        """Embeddings -> decoder layers -> final norm -> LM head over the hidden states h[pick] (all without)."""
        x = self.tok_embeddings(input_ids)  # (B, T, dim)
        cfg = self.config
        with kernels.exact_mode() if self._exact else contextlib.nullcontext():
            if kernels.fused_decoder(x):  # on the C++ CPU path every forward's layers run in one C++ call
                h = torch.ops.lookahead.decode_layers(
                    x, self._layer_weights(), ctx.cos, ctx.sin, ctx.cache.buffer, ctx.lens, ctx.slots, ctx.tree_mask,
                    cfg.n_heads, cfg.rope_interleaved, cfg.norm_eps, self.norm.weight, ctx.rows, ctx.nodes)
                h = h if pick is None else h[pick]  # after the final norm
            else:
                for layer in self.layers:
                    x = layer(x, ctx)
                h = self.norm(x if pick is None else x[pick])
            return torch.ops.lookahead.linear(h, self.output.weight, None)  # the LM head

    def _layer_weights(self) -> list[torch.Tensor]:
        """Every layer's tensors in decode_layers' order (kernels.ops.LAYER_WEIGHTS, checked against the C++ op's
        own list when the ops load); an absent one is empty. Kept between steps (gathering them through the modules
        costs about 1 ms of Python a step); `.to()` and the like (`_apply`) and `load_state_dict` make it anew, and
        so must anything else that puts a new Parameter object into a layer (`model._weights_list = None`)."""
        cached = self._weights_list
        if cached is not None and cached[1] == (self.dtype, self.device):
            return cached[0]
        none = self._no_tensor
        if none.dtype != self.dtype or none.device != self.device:
            none = self._no_tensor = torch.empty(0, dtype=self.dtype, device=self.device)
        out = []
        for layer in self.layers:
            weights = layer.weights()
            out += [none if weights[name] is None else weights[name] for name in kernels.LAYER_WEIGHTS]
        self._weights_list = (out, (self.dtype, self.device))
        return out

    def forward(self, input_ids: torch.Tensor) -> CausalLMOutput:
        """Full causal forward without a cache of the caller's: logits [B, T, V] (parity and perplexity checks). The
        rows run as a prefill into a scratch cache of T slots."""
        self._check_ids(input_ids)
        B, T = input_ids.shape
        return CausalLMOutput(self._prefill(input_ids, self.kv_cache(B, T), None))

    def _prefill(self, input_ids: torch.Tensor, cache: KVCache, pick: tuple | None) -> torch.Tensor:
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T), also the K/V slots
        ctx = self._context("prefill", positions, T, cache=cache, slots=positions,
                            lens=torch.zeros(B, dtype=torch.long, device=input_ids.device))
        return self._run(input_ids, ctx, pick)

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """input_ids [B, T] right-padded, lengths [B] real tokens per row -> logits [B, V] after each row's last
        real token. Writes K/V at slots 0..T-1 (padding slots are scratch) and sets cache.lens = lengths."""
        B = input_ids.shape[0]
        logits = self._prefill(input_ids, cache, (torch.arange(B, device=input_ids.device), lengths - 1))
        cache.lens.copy_(lengths)
        return logits

    def verify(self, tokens: torch.Tensor, depths: torch.Tensor, cache: KVCache,
               tree_mask: torch.Tensor | None) -> torch.Tensor:
        """Forward over draft trees: tokens/depths [B, T] (node 0 = root), tree_mask [B, T, T] or None for a
        chain -> logits [B, T, V]. Node i is at position cache.lens + depths[:, i] and its K/V go to slot
        cache.lens + i; cache.lens is not advanced (compaction does that)."""
        T = tokens.shape[1]
        slots = cache.lens[:, None] + torch.arange(T, device=tokens.device)  # (B, T)
        ctx = self._context("verify", cache.lens[:, None] + depths, cache.max_len, cache=cache, slots=slots,
                            lens=cache.lens, tree_mask=tree_mask)
        return self._run(tokens, ctx)

    def verify_ragged(self, tokens: torch.Tensor, rows: torch.Tensor, nodes: torch.Tensor, depths: torch.Tensor,
                      cache: KVCache, tree_mask: torch.Tensor | None, logit_index: torch.Tensor | None = None,
                      ) -> torch.Tensor:
        """Forward over every row's tokens flattened into one dimension (no padding to the longest row): tokens,
        rows, nodes, depths [N]; token n is node nodes[n] of cache row rows[n], at position cache.lens[rows[n]] +
        depths[n], its K/V at slot cache.lens[rows[n]] + nodes[n]. tree_mask [N, W] bool: token n sees node j of
        its own row (itself and its ancestors; None = every row's tokens one causal chain). -> logits [M, V] of the
        tokens logit_index [M] (default all N): the LM head runs on those only. cache.lens is not advanced.
        A row may carry a causal chain (a prompt chunk) and a tree under its last token in the same step."""
        N = tokens.shape[0]
        lens = cache.lens[rows]  # (N,)
        ctx = self._context("verify", (lens + depths)[None], cache.max_len, cache=cache, slots=(lens + nodes)[None],
                            lens=cache.lens, tree_mask=tree_mask, rows=rows, nodes=nodes)
        index = logit_index if logit_index is not None else torch.arange(N, device=tokens.device)
        return self._run(tokens[None], ctx, (0, index))

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
                torch.int64, torch.int32):
            raise ValueError("input_ids must be an integer tensor of shape [batch, tokens], e.g. "
                             "tokenizer(text, return_tensors='pt').input_ids")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token per row")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {self.config.vocab_size}): "
                             "was it made with this model's tokenizer?")

    def kv_cache(self, batch: int, max_len: int) -> KVCache:
        """A static cache of `batch` rows of `max_len` slots for this model (prefill / verify by hand; generate's
        engine keeps its own)."""
        cfg = self.config
        return KVCache(cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim, self.dtype, self.device)

    # ---- exactness ---------------------------------------------------------------------------------------
    @property
    def exact(self) -> bool:
        """Whether forwards run batch-invariant (set_exact)."""
        return self._exact

    def set_exact(self, on: bool) -> bool:
        """Batch-invariant forwards (LookaheadConfig.exact): where the Triton kernels run (CUDA), the linear layers,
        RMSNorms and tree attention take their invariant kernels (kernels.ops.exact_mode), so a node verified among
        T gets the bits of the one-token step that later decodes it and bf16/fp16 lookahead returns plain decoding's
        tokens (plain decoding must run with it on too). The CPU ops are exact already. Returns the previous
        setting; CUDA graphs captured before a change replay the old kernels, so the caller recaptures them."""
        if not isinstance(on, bool):
            raise ValueError(f"set_exact takes a bool, got {on!r}")
        previous, self._exact = self._exact, on
        return previous

    # ---- weights -------------------------------------------------------------------------------------------
    def load_state_dict(self, *args, **kwargs):
        """nn.Module's, then the decode step's weight list is gathered anew (assign=True puts new Parameters in)."""
        result = super().load_state_dict(*args, **kwargs)
        self._weights_list = None
        return result

    def _apply(self, fn, recurse=True):
        """.to() / .float() / .cuda() / ...: the RoPE frequencies stay fp32 and the RoPE table is made anew."""
        super()._apply(fn, recurse)
        self._rope_tables = self._weights_list = None
        if getattr(self.tok_embeddings, "act_dtype", None) is not None:  # GGUF blocks stay; the activations
            self.tok_embeddings.act_dtype = self.norm.weight.dtype       # follow the norms' dtype
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)  # RoPE frequencies stay fp32
        return self

    # ---- generation ----------------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, **kwargs):
        """Greedy or sampled generation, lookahead on by default; see docs/API.md."""
        return type(self).run_generate(self, input_ids, **kwargs)
