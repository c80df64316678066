"""The engine: one step runner behind `generate`, `lookahead serve` and replay (engine.py), the step itself
(step.py), sampling, the step's measured price and the drafting gate (pricing.py), and what generation keeps on a
model between calls (state.py)."""

from lookahead.engine.engine import PREFILL_CHUNK_TOKENS, ContextTooLong, Engine, Sequence, StopStrings, context_limit
from lookahead.engine.generation import generate  # installs model.generate (CausalLM.run_generate)
from lookahead.engine.state import GenerationState  # installs model.state's type (CausalLM.new_state)

__all__ = ["PREFILL_CHUNK_TOKENS", "ContextTooLong", "Engine", "GenerationState", "Sequence", "StopStrings",
           "context_limit", "generate"]
