"""Serving: an OpenAI-compatible HTTP server (`lookahead serve`) whose `Scheduler` admits, cancels and evicts requests
around the library's one `Engine`, and its load benchmark (`lookahead bench-serve`). Needs the `serve` extra
(fastapi, uvicorn, prometheus_client; httpx for the bench).
"""

from lookahead.serve.scheduler import ContextTooLong, EngineClosed, Finished, QueueFull, Scheduler, Tokens

__all__ = ["ContextTooLong", "EngineClosed", "Finished", "QueueFull", "Scheduler", "Tokens"]
