"""lookahead: lossless lookahead decoding with trie-drafted token trees and Triton tree attention."""

from lookahead import engine  # the step runner; importing it gives the models `generate` and `state`
from lookahead.config import LookaheadConfig
from lookahead.drafting.drafter import Drafter
from lookahead.drafting.trie import TokenTrie

__version__ = "0.1.0"
__all__ = ["Drafter", "LookaheadConfig", "TokenTrie", "__version__", "engine"]
