"""Serving: an OpenAI-compatible HTTP server over an iteration-level batching engine (`lookahead serve`), and
its load benchmark (`lookahead bench-serve`). Needs the `serve` extra (fastapi, uvicorn; httpx for the bench).
"""

from lookahead.serve.engine import ContextTooLong, Engine, EngineClosed, Finished, QueueFull, SamplingParams, Tokens

__all__ = ["ContextTooLong", "Engine", "EngineClosed", "Finished", "QueueFull", "SamplingParams", "Tokens"]
