"""lookahead inside other engines: `lookahead.integrations.vllm.LookaheadProposer` (vLLM's custom_class drafter)."""
