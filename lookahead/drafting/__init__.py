"""Drafting: what a step verifies. The token trie and the suffix automaton hold what the context, the references and
past outputs say may come next; tree.py builds and packs draft trees; the Drafter ranks candidates and its size
policy keeps the prefix that pays at the step's price (`StepPrice`). Nothing here needs a model."""

from lookahead.drafting.drafter import CostModel, Drafter, StepPrice
from lookahead.drafting.trie import TokenTrie

__all__ = ["CostModel", "Drafter", "StepPrice", "TokenTrie"]
