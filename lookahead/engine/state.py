"""What generation keeps on a model between calls, in one typed object (`model.state`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lookahead.drafting.drafter import Calibration
from lookahead.drafting.pools import DraftPools
from lookahead.drafting.trie import TokenTrie
from lookahead.models.causal_lm import CausalLM

if TYPE_CHECKING:
    from lookahead.drafting.drafter import StepCost
    from lookahead.engine.engine import Engine


@dataclass
class GenerationState:
    """trie: the global draft source, kept across calls (`model.trie`). engine: generate's engine (its static KV
    cache and CUDA graphs), rebuilt only when a call needs more rows or a longer context.
    cost_curves: measured verify seconds by tree size, per model/device/dtype/threads/graphs key.
    step_costs: the learned cost of batched steps (`StepCost`) per such key, kept across calls and engines.
    calibration: the drafter's predicted-vs-observed acceptance statistics, kept as the trie warms up.
    successors: the model's latest top-k next tokens per token, read off verify logits (recycled branches).
    pools: the drafting pools of requests given a pool key (`lookahead.drafting.pools`), apart from the trie and
    from each other."""
    trie: TokenTrie = field(default_factory=TokenTrie)
    engine: Engine | None = None
    cost_curves: dict[str, dict[int, float]] = field(default_factory=dict)
    step_costs: dict[str, StepCost] = field(default_factory=dict)
    calibration: Calibration = field(default_factory=Calibration)
    successors: dict[int, list[int]] = field(default_factory=dict)
    pools: DraftPools = field(default_factory=DraftPools)

    def set_trie(self, trie: TokenTrie) -> None:
        """`model.trie = trie`: only a TokenTrie (a loaded one warms the model up)."""
        if not isinstance(trie, TokenTrie):
            raise ValueError(f"model.trie must be a lookahead.TokenTrie, got {type(trie).__name__}: use "
                             "model.trie.clear() to empty it or TokenTrie.load(path) to restore one")
        self.trie = trie

    def forget_drafting(self) -> None:
        """Forget what drafting learned from outputs (the trie's contents, the pools, the recycled tokens, the
        calibration); the engine and the cost curves stay. `model.trie.clear()` empties only the trie."""
        self.trie.clear()
        self.successors.clear()
        self.pools.clear()
        self.calibration = Calibration()


CausalLM.new_state = GenerationState  # what model.state holds (the model imports nothing of the engine)
