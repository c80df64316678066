"""Token trie of n-gram branches: the draft source of lookahead decoding.

Every window of `branch_length` tokens of what the trie has seen is a root-to-node path; a node's count is
how many windows pass through it. Generated tokens count globally and persist across requests; a request's
prompt and references count locally (tagged with its id) and are dropped when the request ends. Retrieval
matches the longest suffix of the context and returns the best-scoring subtree under a node budget, ranked
by this request's local count first, then the global count.
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Sequence
from pathlib import Path

FORMAT = "lookahead-token-trie"
VERSION = 1


class _Node:
    __slots__ = ("token", "parent", "children", "count", "local")

    def __init__(self, token: int, parent: _Node | None):
        self.token = token
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.count = 0                     # global windows through this node
        self.local: dict[int, int] | None = None  # request id -> local windows through this node

    def empty(self) -> bool:
        return self.count <= 0 and not self.local and not self.children


class _Request:
    __slots__ = ("tail", "open", "counted", "touched")

    def __init__(self, tail: list[int]):
        self.tail = tail                      # last branch_length - 1 tokens of the sequence
        self.open: list[_Node] | None = None  # nodes of the windows still growing (None: walk them again)
        self.counted = False                  # whether the windows of the tail hold their global counts
        self.touched: list[_Node] = []        # nodes holding this request's local counts


class TokenTrie:
    """n-gram trie with request-local and global counts, bounded to max_trie_nodes nodes."""

    def __init__(self, branch_length: int = 12, max_trie_nodes: int = 1 << 20):
        if branch_length < 2 or max_trie_nodes < 16:
            raise ValueError("TokenTrie needs branch_length >= 2 and max_trie_nodes >= 16")
        self.branch_length = branch_length
        self.max_trie_nodes = max_trie_nodes
        self.root = _Node(-1, None)
        self._size = 0
        self._requests: dict[int, _Request] = {}

    def __len__(self) -> int:
        return self._size

    def clear(self) -> None:
        """Forget everything, running requests' local counts included."""
        self.root = _Node(-1, None)
        self._size = 0
        for req in self._requests.values():
            req.open, req.counted, req.touched = None, False, []

    # ---- insertion ---------------------------------------------------------------------------------------------
    def _child(self, node: _Node, token: int) -> _Node:
        child = node.children.get(token)
        if child is None:
            child = node.children[token] = _Node(token, node)
            self._size += 1
        return child

    def _insert_windows(self, tokens: Sequence[int], weight: int, request: int | None) -> None:
        L = self.branch_length
        touched = self._requests[request].touched if request is not None else None
        for start in range(len(tokens)):
            node = self.root
            for token in tokens[start:start + L]:
                node = self._child(node, token)
                if touched is None:
                    node.count += weight
                else:
                    if node.local is None:
                        node.local = {}
                    node.local[request] = node.local.get(request, 0) + weight
                    touched.append(node)

    def insert(self, tokens: Sequence[int], weight: int = 1) -> None:
        """Insert every window of a whole sequence with global counts (warm-up, or outputs from elsewhere)."""
        if weight < 1:
            raise ValueError(f"weight must be >= 1, got {weight}")
        self._insert_windows([int(t) for t in tokens], weight, None)
        self._bound()

    def begin_request(self, request_id: int, prompt: Sequence[int],
                      references: Sequence[Sequence[int]] = ()) -> None:
        """Insert a request's prompt and references with counts local to it."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id} is already running in this trie")
        prompt = [int(t) for t in prompt]
        self._requests[request_id] = _Request(prompt[-(self.branch_length - 1):])
        for seq in (prompt, *references):
            self._insert_windows([int(t) for t in seq], 1, request_id)
        self._bound()

    def append(self, request_id: int, tokens: Sequence[int]) -> None:
        """Stream a running request's new tokens in: every window they extend gains a global count.
        O(len(tokens) * branch_length)."""
        req = self._requests[request_id]
        L = self.branch_length
        if req.open is None:
            self._open_windows(req)
        for token in tokens:
            token = int(token)
            grown = []
            for node in [*req.open, self.root]:
                child = self._child(node, token)
                child.count += 1
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
            node = self.root
            for token in req.tail[start:]:
                node = self._child(node, token)
                if not req.counted:
                    node.count += 1
            req.open.append(node)
        req.counted = True

    def end_request(self, request_id: int) -> None:
        """Drop the request's local counts; nodes nothing counts any more are removed."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        for node in reversed(req.touched):
            if node.local and request_id in node.local:
                del node.local[request_id]
                if not node.local:
                    node.local = None
            self._prune_up(node)

    def _prune_up(self, node: _Node) -> None:
        while node is not self.root and node.empty() and node.parent is not None:
            parent = node.parent
            if parent.children.get(node.token) is node:
                del parent.children[node.token]
                self._size -= 1
            node.parent = None
            node = parent

    # ---- memory bound ------------------------------------------------------------------------------------------
    def _bound(self) -> None:
        """Decay global counts and evict the weakest leaves until the trie is at most 90% of its bound."""
        if self._size <= self.max_trie_nodes:
            return
        target = int(self.max_trie_nodes * 0.9)
        for req in self._requests.values():  # open windows may point at evicted nodes: walk them again later
            req.open = None
        leaves = []
        stack = [self.root]
        while stack:  # halve every global count; collect the leaves nothing local holds
            node = stack.pop()
            node.count //= 2
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root and not node.local:
                leaves.append(node)
        for node in leaves:
            if node.count <= 0:
                self._prune_up(node)
        if self._size > target:  # still too big: remove the lowest-count leaves, weakest first
            heap = [(n.count, id(n), n) for n in leaves if n.parent is not None]
            heapq.heapify(heap)
            while self._size > target and heap:
                _, _, node = heapq.heappop(heap)
                parent = node.parent
                if parent is None or node.children or node.local:
                    continue
                del parent.children[node.token]
                node.parent = None
                self._size -= 1
                if parent is not self.root and not parent.children and not parent.local:
                    heapq.heappush(heap, (parent.count, id(parent), parent))

    # ---- retrieval ---------------------------------------------------------------------------------------------
    def _match(self, context: Sequence[int], max_query_length: int) -> _Node | None:
        """The node of the longest context suffix (<= max_query_length tokens) that has continuations."""
        for q in range(min(max_query_length, len(context)), 0, -1):
            node = self.root
            for token in context[len(context) - q:]:
                node = node.children.get(int(token))
                if node is None:
                    break
            if node is not None and node.children:
                return node
        return None

    def retrieve(self, context: Sequence[int], budget: int, request_id: int | None = None,
                 max_query_length: int = 2) -> tuple[list[int], list[int]]:
        """The best draft tree under `budget` nodes after the context's last token.

        Returns (tokens, parents) of the draft nodes in DFS pre-order, root excluded: node k of the lists is
        tree node k + 1 and parents index the tree with 0 = the root. O(budget log budget).
        """
        start = self._match(context, max_query_length) if budget > 0 else None
        if start is None:
            return [], []

        def score(node: _Node) -> tuple[int, int]:
            local = node.local.get(request_id, 0) if node.local and request_id is not None else 0
            return local, node.count

        chosen: dict[int, list[_Node]] = {id(start): []}  # selected node -> its selected children
        heap = []
        tie = 0
        for child in start.children.values():
            s = score(child)
            if s[0] > 0 or s[1] > 0:
                heapq.heappush(heap, (-s[0], -s[1], tie, child, start))
                tie += 1
        taken = 0
        while heap and taken < budget:
            _, _, _, node, parent = heapq.heappop(heap)
            chosen[id(parent)].append(node)
            chosen[id(node)] = []
            taken += 1
            for child in node.children.values():
                s = score(child)
                if s[0] > 0 or s[1] > 0:
                    heapq.heappush(heap, (-s[0], -s[1], tie, child, node))
                    tie += 1
        tokens, parents = [], []
        stack = [(child, 0) for child in reversed(chosen[id(start)])]  # best child first in pre-order
        while stack:
            node, parent_index = stack.pop()
            tokens.append(node.token)
            parents.append(parent_index)
            index = len(tokens)
            stack.extend((child, index) for child in reversed(chosen[id(node)]))
        return tokens, parents

    # ---- persistence -------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the global counts as JSON (request-local counts are transient and not saved)."""
        tokens, parents, counts = [], [], []
        queue = [(self.root, -1)]
        while queue:  # breadth first, so a parent is always listed before its children
            nxt = []
            for node, parent_index in queue:
                for child in node.children.values():
                    if child.count > 0 or child.children:
                        tokens.append(child.token)
                        parents.append(parent_index)
                        counts.append(child.count)
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
            nodes: list[_Node] = []
            for i, (token, parent, count) in enumerate(zip(tokens, parents, counts)):
                if not (isinstance(token, int) and isinstance(parent, int) and isinstance(count, int)):
                    raise ValueError(f"entry {i} is not integers")
                if not -1 <= parent < i:
                    raise ValueError(f"entry {i} has parent {parent}, not an earlier entry")
                node = trie._child(trie.root if parent < 0 else nodes[parent], token)
                node.count = count
                nodes.append(node)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is a damaged TokenTrie file: {e}") from None
        trie._bound()
        return trie
