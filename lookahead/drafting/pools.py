"""Drafting pools: generated history kept apart per tenant (docs/tenants.md).

A drafter's trie learns what every request generates and drafts it for every later request: what a request gets
drafted, and so its speed, tells what other requests produced. A pool is the history of the requests that may see
each other's output (the server keys it by API key and `cache_salt`): its own `TokenTrie` and its own recycled
tokens (the model's latest top-k after a token, read off its contexts). A pooled request drafts from its pool, from
the shared base trie (read-only to it) and from its own prompt, references and output; it writes only its pool.

`DraftPools` holds the pools, least recently used first: each pool is bounded by `max_pool_nodes`, and the base and
all pools together by `max_total_nodes`, which drops the least recently used pools first (a pool whose requests are
still running is emptied instead, their state kept valid).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

from lookahead.drafting.trie import TokenTrie

# A pool's default bound: this share of the base's max_trie_nodes (a quarter of the 1M-node default is 262k
# nodes, about 16k tokens of history at 16-token windows).
POOL_SHARE = 0.25
# Tokens learned across pools between two checks of the total bound: each token adds at most branch_length nodes,
# so the total overshoots by at most this x branch_length nodes between checks (16k at the defaults).
CHECK_EVERY_TOKENS = 1024


@dataclass(eq=False)
class Pool:
    """One pool's history: its trie, its recycled tokens (token -> the model's latest top-k after it) and how
    many running requests draft from it."""
    trie: TokenTrie
    successors: dict[int, list[int]] = field(default_factory=dict)
    running: int = 0


class DraftPools:
    """Pools by key, least recently used first. max_pool_nodes: one pool's trie bound (None = POOL_SHARE of the
    base's max_trie_nodes, at least 16). max_total_nodes: the base and every pool together (None = the base's
    max_trie_nodes: `--max-trie-nodes` stays the one global bound)."""

    def __init__(self, max_pool_nodes: int | None = None, max_total_nodes: int | None = None):
        self.configure(max_pool_nodes, max_total_nodes)
        self._pools: OrderedDict[Hashable, Pool] = OrderedDict()
        self._learned = 0  # tokens learned into pools since the last bound check
        self.dropped = 0   # pools dropped or emptied for the total bound, since start

    def configure(self, max_pool_nodes: int | None = None, max_total_nodes: int | None = None) -> None:
        """Set the bounds (pools made earlier keep their trie's bound until they are dropped)."""
        for name, value in (("max_pool_nodes", max_pool_nodes), ("max_total_nodes", max_total_nodes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 16):
                raise ValueError(f"{name} must be an int >= 16 (trie nodes) or None, got {value!r}")
        self.max_pool_nodes, self.max_total_nodes = max_pool_nodes, max_total_nodes

    def __len__(self) -> int:
        return len(self._pools)

    def values(self) -> tuple[Pool, ...]:
        """The pools, least recently used first."""
        return tuple(self._pools.values())

    def nodes(self) -> int:
        """Trie nodes in all pools (the base excluded). Safe to call from another thread."""
        return sum(len(pool.trie) for pool in self.values())

    def acquire(self, key: Hashable, base: TokenTrie) -> Pool:
        """The pool of `key` for a request that begins (made with the base's window length if new), now the most
        recently used."""
        if key is None:
            raise ValueError("the pool key None is the shared base itself, not a pool")
        pool = self._pools.get(key)
        if pool is None:
            bound = self.max_pool_nodes or max(16, int(base.max_trie_nodes * POOL_SHARE))
            pool = self._pools[key] = Pool(TokenTrie(base.branch_length, bound))
        self._pools.move_to_end(key)
        pool.running += 1
        self.bound(base)
        return pool

    def release(self, pool: Pool, base: TokenTrie) -> None:
        """A request of the pool ended."""
        pool.running = max(0, pool.running - 1)
        self.bound(base)

    def learned(self, tokens: int, base: TokenTrie) -> None:
        """Tokens went into a pool: the total bound is checked every CHECK_EVERY_TOKENS of them."""
        self._learned += tokens
        if self._learned >= CHECK_EVERY_TOKENS:
            self.bound(base)

    def bound(self, base: TokenTrie) -> None:
        """Base + pools over max_total_nodes: drop idle pools, least recently used first, then empty the pools of
        running requests, least recently used first, until the total fits (the base is never touched)."""
        self._learned = 0
        limit = self.max_total_nodes or base.max_trie_nodes
        total = len(base) + self.nodes()
        if total <= limit:
            return
        for key, pool in list(self._pools.items()):
            if total <= limit:
                break
            if pool.running == 0:
                total -= len(pool.trie)
                del self._pools[key]
                self.dropped += 1
        for pool in self._pools.values():
            if total <= limit:
                break
            if len(pool.trie):
                total -= len(pool.trie)
                pool.trie.clear()
                pool.successors.clear()
                self.dropped += 1

    def discard(self, key: Hashable) -> None:
        """Forget an idle pool now (a pool of one request, after it ended); a pool still in use stays."""
        pool = self._pools.get(key)
        if pool is not None and pool.running == 0:
            del self._pools[key]

    def clear(self) -> None:
        """Forget every pool's history (running requests keep valid, empty pools)."""
        for key, pool in list(self._pools.items()):
            if pool.running:
                pool.trie.clear()
                pool.successors.clear()
            else:
                del self._pools[key]
