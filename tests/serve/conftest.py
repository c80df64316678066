"""The server's tests need the `serve` extra (fastapi, uvicorn, httpx, prometheus_client) and the `test` extra's
openai client; where one is missing they are not collected (test_memory.py needs neither)."""

import importlib.util

NEEDS = ("fastapi", "uvicorn", "httpx", "prometheus_client", "openai")
SERVER_TESTS = ["test_serve.py", "test_serve_ops.py", "test_tenants.py"]

collect_ignore = SERVER_TESTS if any(importlib.util.find_spec(name) is None for name in NEEDS) else []
