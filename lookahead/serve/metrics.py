"""`GET /metrics`: the server's Prometheus metrics (prometheus_client, one registry per server), updated by the
decode thread and read by the HTTP thread (prometheus_client's metrics are thread-safe).

Names follow vLLM's where one exists (`lookahead:` prefix instead of `vllm:`): requests running / waiting,
finished requests by reason, prompt and generation tokens, accepted tokens per step, step latency and time to
first token histograms; memory by part (`lookahead:memory_bytes{part=...}`, as in /v1/stats).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 51.2)
_ACCEPTED_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, load=lambda: {"running": 0, "queued": 0}, memory=dict, pools=dict):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("lookahead:num_requests_running", "Requests holding a row of the batch", registry=r)
        self.waiting = Gauge("lookahead:num_requests_waiting", "Requests queued for a row", registry=r)
        self.running.set_function(lambda: load()["running"])
        self.waiting.set_function(lambda: load()["queued"])
        self.memory = Gauge("lookahead:memory_bytes", "Bytes by part: weights, kv_cache, trie, suffix_automata, "
                            "workspace (estimated), rss, rss_peak (the process)", ["part"], registry=r)
        for part in ("weights", "kv_cache", "trie", "suffix_automata", "workspace", "rss", "rss_peak"):
            self.memory.labels(part=part).set_function(lambda part=part: memory().get(part, 0))
        self.pools = Gauge("lookahead:drafting_pools", "Drafting pools (tenant and cache_salt histories) held",
                           registry=r)
        self.pools.set_function(lambda: pools().get("drafting_pools", 0))
        self.pool_nodes = Gauge("lookahead:pool_trie_nodes", "Trie nodes of all drafting pools (the shared trie's "
                                "not included)", registry=r)
        self.pool_nodes.set_function(lambda: pools().get("pool_trie_nodes", 0))
        self.requests = Counter("lookahead:request_success", "Finished requests by reason", ["finished_reason"],
                                registry=r)
        self.prompt_tokens = Counter("lookahead:prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("lookahead:generation_tokens", "Tokens generated", registry=r)
        self.accepted = Histogram("lookahead:accepted_tokens_per_step",
                                  "Tokens a request got from one decode step (1 = a plain step)",
                                  buckets=_ACCEPTED_BUCKETS, registry=r)
        self.step_latency = Histogram("lookahead:step_latency_seconds", "Seconds of one decode step of the batch",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lookahead:time_to_first_token_seconds", "Seconds from a request's arrival to its "
                              "first token", buckets=_TTFT_BUCKETS, registry=r)

    def admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def step(self, seconds: float) -> None:
        self.step_latency.observe(seconds)

    def tokens(self, new: list[int], from_step: bool) -> None:
        """A request's tokens of one prefill or decode step (only decode steps count as accepted per step)."""
        self.generation_tokens.inc(len(new))
        if from_step:
            self.accepted.observe(len(new))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, reason: str) -> None:
        self.requests.labels(finished_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
