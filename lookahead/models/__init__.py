"""Model families served by lookahead, and checkpoint resolution."""

import lookahead.models.checkpoint as checkpoint
from lookahead.models.checkpoint import resolve_checkpoint
from lookahead.models.glm import GlmForLookahead
from lookahead.models.llama import LlamaForLookahead

__all__ = ["GlmForLookahead", "LlamaForLookahead", "checkpoint", "resolve_checkpoint"]
