"""lookahead: lossless lookahead decoding with trie-drafted token trees and Triton tree attention."""

from lookahead.config import LookaheadConfig

__version__ = "0.1.0"
__all__ = ["LookaheadConfig", "__version__"]
