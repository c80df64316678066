"""Benchmarks a person runs from the CLI: `lookahead bench` (vs transformers), `bench-serve` (the server under
load), `bench-vllm` (inside vLLM), `replay` (drafters judged on recorded outputs, without the model)."""
