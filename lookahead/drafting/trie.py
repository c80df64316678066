"""Token trie of n-gram branches: the draft source of lookahead decoding.

Every window of `branch_length` tokens of what the trie has seen is a root-to-node path; a node's count is
how many windows pass through it. Generated tokens count globally and persist across requests; a request's
prompt and references count locally (tagged with its id) and are dropped when the request ends.

Retrieval matches the longest suffix of the context that has continuations and scores every node below the
match by its probability: the product of count ratios (child / parent) along its path, computed for the
local and the global counts separately, the better of the two winning. Nodes come out best-first, so the
sum of a draft's probabilities is its expected number of accepted tokens (before calibration).
"""

from __future__ import annotations

import heapq
import json
import math
import os
from array import array
from collections.abc import Sequence
from pathlib import Path

from lookahead.drafting.tree import preorder

# Count ratios are child / (parent + SMOOTHING), so a continuation seen once is not certain. Replay of the
# shipped recording, CPU curve: 1.44x modeled speedup without it, 1.57x with 0.5, 1.57x with 1, 1.55x with 2.
SMOOTHING = 0.5
# Request-local nodes (running requests' prompt and reference windows) may take at most this share of
# max_trie_nodes on top of the persistent nodes: with the persistent part evicted to 90% of the bound, the trie
# never holds more than 1.1x its bound and keeps >= 90% of it as history when long prompts come in waves.
LOCAL_SHARE = 0.1
FORMAT = "lookahead-token-trie"
VERSION = 1


# Nodes with more children than this get a token -> child dict beside their sibling list (the root, frequent
# tokens); below it a lookup walks the siblings.
WIDE = 16


class _Request:
    __slots__ = ("tail", "open", "counted", "local")

    def __init__(self, tail: list[int]):
        self.tail = tail                    # last branch_length - 1 tokens of the sequence
        self.open: list[int] | None = None  # nodes of the windows still growing (None: walk them again)
        self.counted = False                # whether the windows of the tail hold their global counts
        self.local: dict[int, int] = {}     # node -> this request's local windows through it, in first-touch order


class Candidates:
    """A match's draft nodes, best first, (token, parent index, probability) as `TokenTrie.candidates` lists
    them, computed only as far as they are read (`has(i)`, `[i]`; `len` computes them all): the same nodes in
    the same order as computing all `limit` at once, as long as the trie does not change in between (a step's
    drafting reads them before it learns anything)."""

    __slots__ = ("_trie", "_local", "_limit", "_heap", "_out", "_tie")
    EMPTY: Candidates

    def __init__(self, trie: TokenTrie | None, start: int = -1, global_root: float = 0, local_root: float = 0,
                 local: dict[int, int] | None = None, limit: int = 0):
        self._trie, self._local, self._limit = trie, local if local is not None else {}, limit
        self._heap: list[tuple] = []
        self._out: list[tuple[int, int, float]] = []
        self._tie = 0
        if trie is not None:
            self._push(start, -1, 1.0, 1.0, global_root, local_root)

    def _push(self, node: int, index: int, p_global: float, p_local: float, g_den: float, l_den: float) -> None:
        """node's children into the race, each with its global and local path probabilities."""
        trie, local, heap = self._trie, self._local, self._heap
        count, nxt = trie._count, trie._next
        child = trie._first[node]
        while child >= 0:
            pg = p_global * min(1.0, count[child] / (g_den + SMOOTHING)) if g_den > 0 else 0.0
            loc = local.get(child, 0)
            pl = p_local * min(1.0, loc / (l_den + SMOOTHING)) if l_den > 0 else 0.0
            if pg > 0 or pl > 0:
                heapq.heappush(heap, (-max(pg, pl), self._tie, child, index, pg, pl, loc))
                self._tie += 1
            child = nxt[child]

    def has(self, i: int) -> bool:
        """Whether there is an i-th node (computing the nodes up to it)."""
        out, heap = self._out, self._heap
        while len(out) <= i and heap and len(out) < self._limit:
            neg_p, _, node, parent, pg, pl, loc = heapq.heappop(heap)
            out.append((self._trie._token[node], parent, -neg_p))
            self._push(node, len(out) - 1, pg, pl, self._trie._count[node], loc)
        return i < len(out)

    def __getitem__(self, i: int) -> tuple[int, int, float]:
        if not self.has(i):
            raise IndexError(i)
        return self._out[i]

    def __len__(self) -> int:
        self.has(self._limit)
        return len(self._out)

    def __bool__(self) -> bool:
        return self.has(0)

    def __iter__(self):
        i = 0
        while self.has(i):
            yield self._out[i]
            i += 1


Candidates.EMPTY = Candidates(None)


class TokenTrie:
    """n-gram trie with request-local and global counts, bounded to max_trie_nodes nodes.

    Layout: a node is an index into flat arrays (44 bytes a node in all: token, parent, first / last child, next /
    previous sibling, how many running requests hold local counts on it, global count, recency stamp); children
    are a sibling list in insertion order, with a dict for wide nodes. Index 0 is the root; freed indices are
    reused. A running request's local counts live in its own dict and leave with it."""

    def __init__(self, branch_length: int = 16, max_trie_nodes: int = 1 << 20):
        if branch_length < 2 or max_trie_nodes < 16:
            raise ValueError("TokenTrie needs branch_length >= 2 and max_trie_nodes >= 16")
        self.branch_length = branch_length
        self.max_trie_nodes = max_trie_nodes
        self._requests: dict[int, _Request] = {}
        self._reset()

    def _reset(self) -> None:
        self._token, self._parent = array("i", [-1]), array("i", [-1])
        self._first, self._last = array("i", [-1]), array("i", [-1])  # children: first and last
        self._next, self._prev = array("i", [-1]), array("i", [-1])   # siblings
        self._holders = array("i", [0])  # running requests with local counts on the node
        self._count = array("q", [0])    # global windows through the node
        self._stamp = array("q", [0])    # the trie's clock when a window last passed through (recency)
        self._wide: dict[int, dict[int, int]] = {0: {}}  # node -> {token: child} for nodes with many children
        self._free: list[int] = []
        self._size = 0
        self._transient = 0  # nodes only running requests' local counts hold: they leave with their requests
        self._clock = 0  # tokens inserted so far: the time scale of recency

    def __len__(self) -> int:
        return self._size

    def clear(self) -> None:
        """Forget everything, running requests' local counts included."""
        self._reset()
        for req in self._requests.values():
            req.open, req.counted, req.local = None, False, {}

    # ---- nodes -------------------------------------------------------------------------------------------------
    def _find(self, node: int, token: int) -> int:
        """The child of node for token, -1 if none."""
        wide = self._wide.get(node)
        if wide is not None:
            return wide.get(token, -1)
        tokens, nxt = self._token, self._next
        child = self._first[node]
        while child >= 0 and tokens[child] != token:
            child = nxt[child]
        return child

    def _children(self, node: int) -> list[int]:
        """node's children in insertion order."""
        out, nxt = [], self._next
        child = self._first[node]
        while child >= 0:
            out.append(child)
            child = nxt[child]
        return out

    def _child(self, node: int, token: int) -> int:
        child = self._find(node, token)
        if child < 0:
            child = self._new(node, token)
        self._stamp[child] = self._clock
        return child

    def _new(self, parent: int, token: int) -> int:
        """A new last child of parent."""
        last = self._last[parent]
        if self._free:
            node = self._free.pop()
            self._token[node], self._parent[node] = token, parent
            self._first[node] = self._last[node] = self._next[node] = -1
            self._prev[node], self._holders[node], self._count[node] = last, 0, 0
        else:
            node = len(self._token)
            self._token.append(token)
            self._parent.append(parent)
            self._first.append(-1)
            self._last.append(-1)
            self._next.append(-1)
            self._prev.append(last)
            self._holders.append(0)
            self._count.append(0)
            self._stamp.append(0)
        if last < 0:
            self._first[parent] = node
        else:
            self._next[last] = node
        self._last[parent] = node
        wide = self._wide.get(parent)
        if wide is not None:
            wide[token] = node
        elif last >= 0 and self._prev[last] >= 0 and len(self._children(parent)) > WIDE:
            self._wide[parent] = {self._token[c]: c for c in self._children(parent)}
        self._size += 1
        return node

    def _remove(self, node: int) -> None:
        """Unlink a childless node from its parent and free its index."""
        parent, prev, nxt = self._parent[node], self._prev[node], self._next[node]
        if prev < 0:
            self._first[parent] = nxt
        else:
            self._next[prev] = nxt
        if nxt < 0:
            self._last[parent] = prev
        else:
            self._prev[nxt] = prev
        wide = self._wide.get(parent)
        if wide is not None:
            del wide[self._token[node]]
        self._wide.pop(node, None)
        self._parent[node] = -2  # freed
        self._free.append(node)
        self._size -= 1

    def _empty(self, node: int) -> bool:
        return self._count[node] <= 0 and self._holders[node] == 0 and self._first[node] < 0

    # ---- insertion ---------------------------------------------------------------------------------------------
    def _add_count(self, node: int, weight: int) -> None:
        """A global count: a node only a request's local counts held now persists."""
        if self._count[node] <= 0 and self._holders[node]:
            self._transient -= 1
        self._count[node] += weight

    def _insert_windows(self, tokens: Sequence[int], weight: int, request: int | None, room: int = 0) -> int:
        """Every window of tokens, global or local to `request`. A request's windows add at most `room` new
        nodes: when they might need more, the windows go in from the last one back (the text nearest what comes
        next) and a window stops where it would add a node past the room. -> the room left."""
        L = self.branch_length
        local = self._requests[request].local if request is not None else None
        count, holders = self._count, self._holders
        self._clock += len(tokens)
        starts = range(len(tokens))
        if local is not None and len(tokens) * L > room:
            starts = reversed(starts)
        for start in starts:
            node = 0
            for token in tokens[start:start + L]:
                if local is None:
                    node = self._child(node, token)
                    self._add_count(node, weight)
                    continue
                if room <= 0 and self._find(node, token) < 0:
                    break
                node = self._child(node, token)
                held = local.get(node, 0)
                if not held:
                    if count[node] <= 0 and not holders[node]:
                        self._transient += 1  # a new node, held by this request alone
                        room -= 1
                    holders[node] += 1
                local[node] = held + weight
        return room

    def insert(self, tokens: Sequence[int], weight: int = 1) -> None:
        """Insert every window of a whole sequence with global counts (warm-up, or outputs from elsewhere)."""
        if weight < 1:
            raise ValueError(f"weight must be >= 1, got {weight}")
        self._insert_windows([int(t) for t in tokens], weight, None)
        self._bound()

    def begin_request(self, request_id: int, prompt: Sequence[int],
                      references: Sequence[Sequence[int]] = ()) -> None:
        """Insert a request's prompt and references with counts local to it. Running requests' local nodes take
        at most LOCAL_SHARE x max_trie_nodes, a request at most that share over the requests running: a prompt
        past its room keeps the windows of its end."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id} is already running in this trie")
        prompt = [int(t) for t in prompt]
        self._requests[request_id] = _Request(prompt[-(self.branch_length - 1):])
        share = int(self.max_trie_nodes * LOCAL_SHARE)
        room = min(share - self._transient, share // len(self._requests))
        for seq in (prompt, *references):
            room = self._insert_windows([int(t) for t in seq], 1, request_id, room)
        self._bound()

    def append(self, request_id: int, tokens: Sequence[int]) -> None:
        """Stream a running request's new tokens in: every window they extend gains a global count.
        O(len(tokens) * branch_length)."""
        req = self._requests[request_id]
        if not tokens:
            return
        L = self.branch_length
        if req.open is None:
            self._open_windows(req)
        for token in tokens:
            token = int(token)
            self._clock += 1
            grown = []
            for node in [*req.open, 0]:
                child = self._child(node, token)
                self._add_count(child, 1)
                grown.append(child)
            # a window of L tokens is complete and stops growing; the oldest open window is the longest
            req.open = grown[1:] if len(grown) >= L else grown
            req.tail = (req.tail + [token])[-(L - 1):]
        self._bound()

    def _open_windows(self, req: _Request) -> None:
        """Walk the windows that start in the tail, deepest first. The first time (the prompt's tail) they
        gain their global counts; after an eviction they are only re-walked."""
        req.open = []
        for start in range(len(req.tail)):
            node = 0
            for token in req.tail[start:]:
                node = self._child(node, token)
                if not req.counted:
                    self._add_count(node, 1)
            req.open.append(node)
        req.counted = True

    def end_request(self, request_id: int) -> None:
        """Drop the request's local counts; nodes nothing counts any more are removed."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        holders = self._holders
        for node in reversed(req.local):  # children after their parents: deepest first
            holders[node] -= 1
            while node > 0 and self._empty(node):
                parent = self._parent[node]
                self._remove(node)
                self._transient -= 1  # empty: only local counts had held it
                node = parent

    # ---- memory bound ------------------------------------------------------------------------------------------
    def _bound(self) -> None:
        """Over the bound, evict the least useful leaves down to 90% of it: lowest recency-weighted count first
        (count halved per `max_trie_nodes / branch_length` tokens of age, about the text the trie holds), so
        what recent requests produced stays. The bound is on what persists: nodes that only running requests'
        prompts and references hold come on top and leave with their requests (a long prompt never evicts the
        history), so len(trie) <= max_trie_nodes whenever no request is running and <= 1.1 x max_trie_nodes always
        (begin_request keeps the local nodes within LOCAL_SHARE of the bound)."""
        if self._size - self._transient <= self.max_trie_nodes:
            return
        target = int(self.max_trie_nodes * 0.9) + self._transient
        for req in self._requests.values():  # open windows may point at evicted nodes: walk them again later
            req.open = None
        halflife = max(1.0, self.max_trie_nodes / self.branch_length)
        clock, count, stamp, holders, first = self._clock, self._count, self._stamp, self._holders, self._first

        def score(node: int) -> float:
            return math.log2(max(count[node], 1)) - (clock - stamp[node]) / halflife

        parents = self._parent
        heap = [(score(node), node) for node in range(1, len(parents))
                if parents[node] >= 0 and first[node] < 0 and not holders[node]]
        heapq.heapify(heap)
        while self._size > target and heap:
            _, node = heapq.heappop(heap)
            parent = parents[node]
            if parent < 0 or first[node] >= 0 or holders[node]:
                continue
            self._remove(node)
            if parent != 0 and first[parent] < 0 and not holders[parent]:
                heapq.heappush(heap, (score(parent), parent))

    # ---- retrieval ---------------------------------------------------------------------------------------------
    def _match(self, context: Sequence[int], max_query_length: int) -> tuple[int, int]:
        """The node of the longest context suffix (<= max_query_length tokens) that has continuations, and its
        length (-1 and 0 when none matches)."""
        for q in range(min(max_query_length, len(context), self.branch_length - 1), 0, -1):
            node = 0
            for token in context[len(context) - q:]:
                node = self._find(node, int(token))
                if node < 0:
                    break
            if node >= 0 and self._first[node] >= 0:
                return node, q
        return -1, 0

    def matches(self, context: Sequence[int], limit: int, request_id: int | None, max_query_length: int,
                count: int) -> list[tuple[int, int, Candidates]]:
        """`candidates` of the longest match, then of the next shorter matches that have continuations (more
        evidence, other tokens): up to `count` of them, longest first. Each match's nodes are a `Candidates`,
        computed as far as they are read (a step keeps a few of the `limit`)."""
        found = []
        while max_query_length > 0 and len(found) < count:
            q, evidence, nodes = self._candidates(context, limit, request_id, max_query_length)
            if not nodes:
                break
            found.append((q, evidence, nodes))
            max_query_length = q - 1
        return found

    def candidates(self, context: Sequence[int], limit: int, request_id: int | None = None,
                   max_query_length: int = 2) -> tuple[int, int, list[tuple[int, int, float]]]:
        """Up to `limit` draft nodes after the context's last token, best first: (match length, evidence,
        [(token, parent, probability)]) where evidence is how many earlier windows the match rests on, parent
        indexes the list (-1 = the draft's root) and precedes its children, and probability is the node's
        whole-path probability (non-increasing along the list). O(limit log limit).

        A node's probability is the better of its local (this request's prompt and references) and global path
        probabilities, each the product of child / parent count ratios from the match node down. The running
        request's own latest window passes through the match node without a continuation yet: it is not
        counted in the match node's global denominator. Ratios are smoothed (count / (parent count + 0.5)) so
        that a continuation seen once is not certain. Retrieval never changes the trie."""
        q, evidence, nodes = self._candidates(context, limit, request_id, max_query_length)
        return q, evidence, list(nodes)

    def _candidates(self, context: Sequence[int], limit: int, request_id: int | None,
                    max_query_length: int) -> tuple[int, int, Candidates]:
        start, q = self._match(context, max_query_length) if limit > 0 else (-1, 0)
        if start < 0:
            return 0, 0, Candidates.EMPTY
        req = self._requests.get(request_id) if request_id is not None else None
        inflight = bool(req is not None and req.counted and len(req.tail) >= q
                        and req.tail[len(req.tail) - q:] == [int(t) for t in context[len(context) - q:]])
        local = req.local if req is not None else {}
        global_root = self._count[start] - (1 if inflight else 0)
        local_root = local.get(start, 0)
        return q, max(global_root, local_root), Candidates(self, start, global_root, local_root, local, limit)

    def retrieve(self, context: Sequence[int], budget: int, request_id: int | None = None,
                 max_query_length: int = 2) -> tuple[list[int], list[int]]:
        """The `budget` most probable draft nodes after the context's last token as a tree in DFS pre-order, root
        excluded: node k of the lists is tree node k + 1 and parents index the tree with 0 = the root."""
        _, _, nodes = self.candidates(context, budget, request_id, max_query_length)
        return preorder(nodes)

    # ---- persistence -------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the global counts as JSON (request-local counts are transient and not saved)."""
        tokens, parents, counts = [], [], []
        queue = [(0, -1)]
        while queue:  # breadth first, so a parent is always listed before its children
            nxt = []
            for node, parent_index in queue:
                for child in self._children(node):
                    if self._count[child] > 0 or self._first[child] >= 0:
                        tokens.append(self._token[child])
                        parents.append(parent_index)
                        counts.append(self._count[child])
                        nxt.append((child, len(tokens) - 1))
            queue = nxt
        data = {"format": FORMAT, "version": VERSION, "branch_length": self.branch_length,
                "max_trie_nodes": self.max_trie_nodes, "tokens": tokens, "parents": parents, "counts": counts}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, separators=(",", ":")))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenTrie:
        """Read a trie written by save(); a damaged or foreign file raises ValueError."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved trie at {path}")
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a saved TokenTrie (not valid JSON: {e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"{path} is not a saved TokenTrie (format {FORMAT!r} version {VERSION} expected)")
        try:
            trie = cls(int(data["branch_length"]), int(data["max_trie_nodes"]))
            tokens, parents, counts = data["tokens"], data["parents"], data["counts"]
            if not (len(tokens) == len(parents) == len(counts)):
                raise ValueError("tokens, parents and counts differ in length")
            nodes: list[int] = []
            for i, (token, parent, count) in enumerate(zip(tokens, parents, counts)):
                if not (isinstance(token, int) and isinstance(parent, int) and isinstance(count, int)):
                    raise ValueError(f"entry {i} is not integers")
                if not -1 <= parent < i:
                    raise ValueError(f"entry {i} has parent {parent}, not an earlier entry")
                if not -2**31 <= token < 2**31 or not 0 <= count < 2**63:
                    raise ValueError(f"entry {i} has a token or count out of range")
                node = trie._child(0 if parent < 0 else nodes[parent], token)
                trie._count[node] = count
                nodes.append(node)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is a damaged TokenTrie file: {e}") from None
        trie._bound()
        return trie
