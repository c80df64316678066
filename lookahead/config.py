"""lookahead's settings: `LookaheadConfig` (what a user sets per call), the fixed limits every module imports,
and the knobs read from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MAX_TREE_NODES = 128  # nodes of one verify tree, the root included: the Triton kernels' tile holds 128
LAYOUTS = ("hier", "par")  # draft tree layouts: the trie's shape, or independent root-to-leaf chains


def cache_dir() -> Path:
    """$LOOKAHEAD_CACHE (default ~/.cache/lookahead): converted checkpoints and measured cost curves."""
    return Path(os.environ.get("LOOKAHEAD_CACHE") or Path.home() / ".cache" / "lookahead")


def forced_kernels() -> str:
    """LOOKAHEAD_KERNELS: '' (Triton on CUDA, torch elsewhere), 'torch' or 'triton'."""
    forced = os.environ.get("LOOKAHEAD_KERNELS", "").lower()
    if forced not in ("", "torch", "triton"):
        raise ValueError(f"LOOKAHEAD_KERNELS must be 'torch' or 'triton', got {forced!r}")
    return forced


def value_checks_on_cuda() -> bool:
    """LOOKAHEAD_CHECKS=1: kernel launchers also check tensor values on CUDA (a device-to-host sync each)."""
    return os.environ.get("LOOKAHEAD_CHECKS", "") == "1"


def cuda_graphs_enabled() -> bool:
    """LOOKAHEAD_CUDA_GRAPHS=0 turns the captured decode steps off (e.g. to see per-kernel NVTX ranges)."""
    return os.environ.get("LOOKAHEAD_CUDA_GRAPHS", "1") != "0"


def draft_gate_enabled() -> bool:
    """LOOKAHEAD_DRAFT_GATE=0 turns the engine's drafting gate off: every step drafts what the size policy keeps,
    even where drafting measured dearer per token than plain steps (tests that check what drafting does)."""
    return os.environ.get("LOOKAHEAD_DRAFT_GATE", "1") != "0"


def cpu_arch() -> str:
    """LOOKAHEAD_CPU_ARCH: the -march the C++ CPU ops are built for (default native: this host's ISA)."""
    arch = os.environ.get("LOOKAHEAD_CPU_ARCH", "native")
    if not arch.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"LOOKAHEAD_CPU_ARCH must be a -march name such as native or x86-64-v3, got {arch!r}")
    return arch


@dataclass(frozen=True)
class LookaheadConfig:
    """How drafts are retrieved and verified. Invalid values raise ValueError at construction.

    decoding_length: most draft nodes verified per step (the root, i.e. the last committed token, excluded).
    branch_length: length of the token windows inserted into the trie (the deepest a draft can reach).
    max_query_length: the longest context suffix matched against the trie (longest match first; at most
        branch_length - 1 tokens are ever matched, leaving room for a draft below the match).
    layout: "hier" (trie-shaped tree, shared prefixes once) or "par" (independent branches).
    adaptive: pick each step's draft by expected tokens per unit of the measured verify cost (a plain step
        when no draft pays); False drafts up to decoding_length nodes every step.
    max_trie_nodes: memory bound of the trie; eviction of its least recently useful nodes keeps it there.
    recycle_top_k: the model's top-k next tokens kept from each verify to draft where the trie has nothing
        (Token Recycling); 0 turns it off.
    exact: the batch-invariant verify step (`model.set_exact`): on CUDA with the Triton kernels, a node verified
        in a tree gets the bits of the one-token step that decodes it, so bf16/fp16 lookahead returns plain
        decoding's tokens bit for bit (generate turns it on for the model, and it stays on for later plain calls
        until `model.set_exact(False)`). Off by default: its GPU cost is not measured yet (issue 21). fp32 and the
        CPU path are exact already and ignore it.
    """

    decoding_length: int = 64
    branch_length: int = 16
    max_query_length: int = 8
    layout: str = "hier"
    adaptive: bool = True
    max_trie_nodes: int = 1 << 20
    recycle_top_k: int = 8
    exact: bool = False

    @classmethod
    def for_trie(cls, trie, **settings) -> LookaheadConfig:
        """The defaults (and `settings`) with this TokenTrie's branch_length and max_trie_nodes, so a trie saved with
        other settings just works: what `lookahead=True`, a bare `Drafter`, the server and the vLLM proposer use."""
        from lookahead.drafting.trie import TokenTrie

        if not isinstance(trie, TokenTrie):
            raise ValueError(f"for_trie needs a TokenTrie, got {type(trie).__name__}")
        return cls(**{"branch_length": trie.branch_length, "max_trie_nodes": trie.max_trie_nodes, **settings})

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"LookaheadConfig: {msg}")

        for name in ("decoding_length", "branch_length", "max_query_length", "max_trie_nodes", "recycle_top_k"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an int, got {value!r}")
        need(0 <= self.decoding_length < MAX_TREE_NODES,
             f"decoding_length must be in [0, {MAX_TREE_NODES - 1}] (draft nodes per step), got {self.decoding_length}")
        need(self.branch_length >= 2, f"branch_length must be >= 2, got {self.branch_length}")
        need(self.max_query_length >= 1, f"max_query_length must be >= 1, got {self.max_query_length}")
        need(self.layout in LAYOUTS, f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        need(isinstance(self.adaptive, bool), f"adaptive must be a bool, got {self.adaptive!r}")
        need(self.max_trie_nodes >= 16, f"max_trie_nodes must be >= 16, got {self.max_trie_nodes}")
        need(0 <= self.recycle_top_k <= 64, f"recycle_top_k must be in [0, 64], got {self.recycle_top_k}")
        need(isinstance(self.exact, bool), f"exact must be a bool, got {self.exact!r}")
