"""User-facing lookahead settings."""

from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("hier", "par")
MAX_DRAFT_NODES = 127  # the verify tile holds at most 128 nodes, the root included


@dataclass(frozen=True)
class LookaheadConfig:
    """How drafts are retrieved and verified. Invalid values raise ValueError at construction.

    decoding_length: most draft nodes verified per step (the root, i.e. the last committed token, excluded).
    branch_length: length of the token windows inserted into the trie (the deepest a draft can reach).
    max_query_length: how many trailing tokens are matched against the trie (longest match first).
    layout: "hier" (trie-shaped tree, shared prefixes once) or "par" (independent branches).
    adaptive: pick each step's draft size from the measured verify cost and running acceptance.
    max_trie_nodes: memory bound of the trie; decay and eviction keep it there.
    """

    decoding_length: int = 64
    branch_length: int = 12
    max_query_length: int = 2
    layout: str = "hier"
    adaptive: bool = True
    max_trie_nodes: int = 1 << 20

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"LookaheadConfig: {msg}")

        for name in ("decoding_length", "branch_length", "max_query_length", "max_trie_nodes"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an int, got {value!r}")
        need(0 <= self.decoding_length <= MAX_DRAFT_NODES,
             f"decoding_length must be in [0, {MAX_DRAFT_NODES}] (draft nodes per step), got {self.decoding_length}")
        need(self.branch_length >= 2, f"branch_length must be >= 2, got {self.branch_length}")
        need(1 <= self.max_query_length < self.branch_length,
             f"max_query_length must be in [1, branch_length), got {self.max_query_length}")
        need(self.layout in LAYOUTS, f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        need(isinstance(self.adaptive, bool), f"adaptive must be a bool, got {self.adaptive!r}")
        need(self.max_trie_nodes >= 16, f"max_trie_nodes must be >= 16, got {self.max_trie_nodes}")
