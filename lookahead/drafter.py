"""The drafter: everything that decides what a step verifies, with no model inside (docs/API.md, "The drafter").

Per step and row it lists candidate draft nodes best-first with a probability each: trie nodes below the
longest context match (`TokenTrie.candidates`), model-recycled nodes, the model's own top-k next tokens read
off earlier verify logits (Token Recycling), which fill in where the trie has nothing and extend its leaves,
and a copy chain: the continuation of the longest earlier occurrence, of any length, of the text's current
suffix in the request's prompt, references and output (`SuffixAutomaton`), up to 64 tokens deep. Trie and
recycled probabilities are calibrated online against what steps actually accept, per source, match length and
probability bin; a copy node's probability is the product of observed acceptance rates per (match length bin,
distance from the match end bin). The size policy then takes the prefix of that order, cut at a tree bucket,
that maximises expected tokens per unit of verify cost:  (1 + sum of the kept nodes' probabilities) / cost(tree nodes),
an empty draft (a plain one-token step) when nothing pays.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from lookahead.config import LookaheadConfig
from lookahead.cost import CostModel, StepPrice
from lookahead.draft import TREE_BUCKETS, bucket_size
from lookahead.pools import DraftPools, Pool
from lookahead.suffix import SuffixAutomaton
from lookahead.trie import TokenTrie, preorder

# Prior probability that the model's rank-r next token (from its latest verify) is what it produces next
# time. Measured on the shipped SmolLM2 recording: where a token had been seen before, its latest rank-1
# successor was the next token 32% of the time, rank 2 9%, rank 3 5%, rank 4 3%. Calibration refines it.
RECYCLED_PRIOR = (0.35, 0.08, 0.04, 0.025, 0.015, 0.01, 0.008, 0.006)
# Trie matches drafted from: the longest, and the next shorter one with continuations (replay, CPU curve:
# 1.604x with the longest alone, 1.608x with two, 1.603x with three).
BACKOFF_MATCHES = 2
# The kept nodes' own accuracy (Drafter.kept_accuracy): the decay per settled step, the predicted p it needs before
# it counts, and the least it may scale p by.
KEPT_DECAY = 0.99
KEPT_EVIDENCE = 20.0
KEPT_TRUST_MIN = 0.25
P_BINS = (0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # upper edges; the last bin is 1
# Copy chains: the deepest a chain runs, and the prior probability that a copied token is accepted given its
# parent was, per match length bin (1, 2, 3-4, 5-8, 9-16, 17-32, 33+ tokens), before observations refine it.
# Depth: on the copy-heavy replay (h100-7b) 39 steps accepted 32+ tokens, 63 at most; 16 deep loses 0.01x on
# Spec-Bench's h100-7b replay. The prior sits below the rates observed for a chain's first token on the
# Spec-Bench replay (match 1: 22%, 2: 46%, 3-4: 57%, 5-8: 79%, 9-16: 84%, 17+: 97%; deeper tokens more), so a
# chain earns its depth; priors at the observed rates replayed the same (1.62x cpu-smollm2, 1.81x h100-7b).
COPY_DEPTH = 64
COPY = -1  # the copy chain's tag where trie nodes carry their match's index
COPY_PRIOR = (0.15, 0.3, 0.45, 0.6, 0.7, 0.8, 0.85)
COPY_PRIOR_MASS = 4.0  # pseudo-trials of the prior


def _log2_bin(n: int) -> int:
    """1, 2, 3-4, 5-8, 9-16, 17-32, 33+ -> 0..6."""
    return min(max(n - 1, 0).bit_length(), 6)


def _match_bin(q: int) -> int:
    return 0 if q <= 0 else 1 if q == 1 else 2 if q == 2 else 3 if q <= 4 else 4


def _evidence_bin(n: int) -> int:
    return 0 if n <= 1 else 1 if n <= 3 else 2


@dataclass
class Calibration:
    """Observed acceptance per bin (source, match length bin, evidence bin, probability bin): sums of predicted
    and of observed acceptance, decayed so they follow the trie as it warms.
    calibrated p = p * (observed + prior) / (predicted + prior)."""
    decay: float = 0.999
    prior: float = 2.0  # pseudo-mass of predicted acceptance the raw probability starts with
    stats: dict[tuple[str, int, int, int], list[float]] = field(default_factory=dict)
    # copy chains: (match length bin, distance bin) -> [trials, accepted], trials = parent accepted
    copy: dict[tuple[int, int], list[float]] = field(default_factory=dict)

    @staticmethod
    def key(source: str, q: int, evidence: int, p: float) -> tuple[str, int, int, int]:
        return source, _match_bin(q), _evidence_bin(evidence), bisect.bisect_left(P_BINS, p)

    def ratio(self, key: tuple[str, int, int, int]) -> float:
        predicted, observed = self.stats.get(key, (0.0, 0.0))
        return (observed + self.prior) / (predicted + self.prior)

    def observe(self, key: tuple[str, int, int, int], p: float, accepted: bool) -> None:
        entry = self.stats.setdefault(key, [0.0, 0.0])
        entry[0] = entry[0] * self.decay + p
        entry[1] = entry[1] * self.decay + float(accepted)

    def copy_rate(self, match_length: int, distance: int) -> float:
        """Probability that a copy chain's node `distance` tokens past the end of a `match_length`-token match is
        accepted, given that its parent was."""
        m = _log2_bin(match_length)
        trials, accepted = self.copy.get((m, _log2_bin(distance)), (0.0, 0.0))
        return (accepted + COPY_PRIOR_MASS * COPY_PRIOR[m]) / (trials + COPY_PRIOR_MASS)

    def observe_copy(self, match_length: int, distance: int, accepted: bool) -> None:
        entry = self.copy.setdefault((_log2_bin(match_length), _log2_bin(distance)), [0.0, 0.0])
        entry[0] = entry[0] * self.decay + 1.0
        entry[1] = entry[1] * self.decay + float(accepted)


@dataclass
class _Node:
    token: int
    parent: int      # index in the proposal, -1 = the root (the context's last token)
    p: float         # calibrated probability that this node is accepted
    key: tuple       # calibration bin
    raw: float       # uncalibrated probability
    depth: int
    copy: int = 0    # the copy chain passes through this node, this many tokens past the match end (0 = not)


@dataclass
class _Request:
    suffix: SuffixAutomaton  # references, then prompt + output: the copy chains' source
    sent: list[_Node] = field(default_factory=list)  # the nodes of the last draft, for calibration
    copy_match: int = 0  # match length of the last draft's copy chain
    pool: Pool | None = None  # its drafting pool (None: the shared trie, which it reads and writes)


class Drafter:
    """Trie, draft building and the per-step size policy, shared by `generate`, `lookahead replay` and serving.

    config: None = the defaults (`LookaheadConfig.for_trie` of the given trie). cost_curve: {tree nodes (root
    included): cost}, seconds or relative, shorthand for step_cost=CostModel(cost_curve). step_cost: the step
    price, anything with `cost(rows, tokens)` (`lookahead.cost.StepPrice`: the engine's learned `StepCost`,
    replay's `CostModel`, the vLLM proposer's linear step); neither = draft up to decoding_length nodes every step
    (no size policy).
    trie: a TokenTrie to share (model.trie in generate), whose branch_length must be the config's; None = a new
    one.
    calibration, successors: what the drafter learns besides the trie (acceptance statistics; the model's latest
    top-k next tokens per token), to keep across drafters (model.state's in generate); None = new ones.
    pools: the drafting pools (`lookahead.pools`, docs/tenants.md) of requests begun with a pool key, to keep across
    drafters (model.state's); their history stays apart from the trie's and each other's. None = new ones.
    """

    def __init__(self, config: LookaheadConfig | None = None, cost_curve: Mapping[int, float] | None = None,
                 trie: TokenTrie | None = None, calibration: Calibration | None = None,
                 successors: dict[int, list[int]] | None = None, step_cost: StepPrice | None = None,
                 pools: DraftPools | None = None):
        if config is None:
            config = LookaheadConfig() if trie is None or not isinstance(trie, TokenTrie) else LookaheadConfig.for_trie(
                trie)
        self.config = config
        if not isinstance(config, LookaheadConfig):
            raise ValueError(f"config must be a LookaheadConfig, got {type(config).__name__}")
        if trie is None:
            trie = TokenTrie(branch_length=config.branch_length, max_trie_nodes=config.max_trie_nodes)
        elif not isinstance(trie, TokenTrie):
            raise ValueError(f"trie must be a TokenTrie, got {type(trie).__name__}")
        elif trie.branch_length != config.branch_length:
            raise ValueError(f"the trie's branch_length is {trie.branch_length} but LookaheadConfig.branch_length is "
                             f"{config.branch_length}: pass LookaheadConfig(branch_length={trie.branch_length}) or "
                             f"use TokenTrie(branch_length={config.branch_length}) (its max_trie_nodes may differ)")
        if cost_curve is not None and step_cost is not None:
            raise ValueError("give cost_curve or step_cost, not both (cost_curve={T: c} is step_cost=CostModel(...))")
        if step_cost is not None and not callable(getattr(step_cost, "cost", None)):
            raise ValueError(f"step_cost must have a cost(rows, tokens) method, got {type(step_cost).__name__}")
        self.trie = trie
        self._price = CostModel(cost_curve) if cost_curve is not None else step_cost
        self.calibration = calibration if calibration is not None else Calibration()
        self.successors = successors if successors is not None else {}  # token -> the model's latest top-k
        self.pools = pools if pools is not None else DraftPools()
        self._requests: dict[int, _Request] = {}
        self._kept = [0.0, 0.0]  # decayed sums over the verified nodes: their calibrated p, and how many were accepted

    # ---- a request's life ------------------------------------------------------------------------------------
    def running_requests(self) -> list[int]:
        """The ids of the requests begun and not yet ended."""
        return list(self._requests)

    def begin_request(self, request_id: int, prompt_ids: Sequence[int], references: Sequence[Sequence[int]] = (),
                      pool: Hashable | None = None):
        """A request's drafting starts: its prompt and references become its copy source and request-local trie
        counts. pool: None = the shared trie (read and written, as every request before pools); a key = that pool:
        the request drafts from the pool and the shared trie, and learns into the pool only."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id} is already running in this drafter")
        suffix = SuffixAutomaton()  # built first: bad ids raise before the trie holds anything of the request
        for reference in references:
            suffix.extend(reference)
            suffix.separate()
        suffix.extend(prompt_ids)
        if pool is None:
            self.trie.begin_request(request_id, prompt_ids, references)
            self._requests[request_id] = _Request(suffix)
            return
        drafting_pool = self.pools.acquire(pool, self.trie)
        try:
            drafting_pool.trie.begin_request(request_id, prompt_ids, references)
        except BaseException:
            self.pools.release(drafting_pool, self.trie)
            raise
        self._requests[request_id] = _Request(suffix, pool=drafting_pool)

    def end_request(self, request_id: int) -> None:
        req = self._requests.pop(request_id, None)
        if req is None or req.pool is None:
            self.trie.end_request(request_id)
        else:
            req.pool.trie.end_request(request_id)
            self.pools.release(req.pool, self.trie)

    def update(self, request_id: int, new_tokens: Sequence[int], predictions: Mapping[int, Sequence[int]] | None = None):
        """The tokens a step committed (accepted drafts, then the bonus token), and optionally the model's top-k
        next tokens of the step's nodes {token: [ids]}: calibration, trie and recycled successors learn them."""
        req = self._requests.get(request_id)
        if req is None:
            raise ValueError(f"request {request_id} was not begun in this drafter (call begin_request first)")
        new = [int(t) for t in new_tokens]
        if any(t < 0 for t in new):
            raise ValueError(f"token ids must be >= 0, got {new}")
        if req.sent:
            correct = [False] * len(req.sent)
            for i, node in enumerate(req.sent):  # parents precede children: one pass settles every node
                ok = node.parent < 0 or correct[node.parent]
                correct[i] = ok and node.depth <= len(new) and new[node.depth - 1] == node.token
                if node.key is not None:
                    self.calibration.observe(node.key, node.raw, correct[i])
                if node.copy and ok:  # copy rates are conditional on the parent's acceptance
                    self.calibration.observe_copy(req.copy_match, node.copy, correct[i])
            kept = self._kept
            kept[0] = kept[0] * KEPT_DECAY + sum(n.p for n in req.sent)
            kept[1] = kept[1] * KEPT_DECAY + sum(correct)
            req.sent = []
        req.suffix.extend(new)
        if req.pool is None:
            self.trie.append(request_id, new)
            successors = self.successors
        else:
            req.pool.trie.append(request_id, new)
            successors = req.pool.successors
            self.pools.learned(len(new), self.trie)
        if predictions:
            for token, nxt in predictions.items():
                successors[int(token)] = [int(t) for t in nxt]

    # ---- drafting --------------------------------------------------------------------------------------------
    def draft(self, request_id: int, context_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """The next step's draft for a row whose committed tokens are context_ids: (tokens, parents) in DFS
        pre-order, parents indexing the tree with 0 = the root (the context's last token); ([], []) = plain."""
        return self.draft_batch([request_id], [context_ids])[0]

    def draft_batch(self, request_ids: Sequence[int], contexts: Sequence[Sequence[int] | None],
                    batch_size: int | None = None, extra_tokens: int = 0) -> list[tuple[list[int], list[int]]]:
        """Drafts for the rows of one step, priced together. Every row verifies its own tree (a ragged step: no
        row is padded to another's size), so the step verifies N = rows + kept nodes + extra_tokens tokens and
        costs price.cost(rows, N / rows). The policy keeps, across all rows, the nodes of highest calibrated
        probability while they raise the expected tokens per cost, (drafting rows + sum of kept p) / (a plain
        step of the rows + what the kept nodes add to the step, priced at its N with the prompt chunks in): each
        row keeps the prefix of its proposal that pays at the step's marginal price, and a row with nothing worth
        verifying costs its root alone. Keeping nothing is among the choices, so a step never
        prices below a plain one. A None context is a row that takes no draft (finished); batch_size (default:
        the rows given) is the step's rows; extra_tokens: tokens of the step besides the rows' trees (prompt
        chunks riding in it)."""
        limit = self.config.decoding_length
        rows = batch_size if batch_size is not None else len(contexts)
        proposals = [self._proposal(rid, ctx, limit, rows, extra_tokens) if ctx is not None and limit > 0 else []
                     for rid, ctx in zip(request_ids, contexts)]
        keep = self._choose_nodes(proposals, rows, sum(ctx is not None for ctx in contexts), extra_tokens)
        out = []
        for rid, nodes, k in zip(request_ids, proposals, keep):
            nodes = nodes[:k]
            if rid in self._requests:
                self._requests[rid].sent = nodes
            out.append(preorder([(n.token, n.parent) for n in nodes]))
        return out

    def kept_accuracy(self) -> float:
        """Accepted over predicted (sum of calibrated p) of the nodes the policy kept lately, in [KEPT_TRUST_MIN, 1]
        (1 until KEPT_EVIDENCE nodes' worth of p were kept). The calibration is per bin; the nodes that win the
        step's selection are the ones whose p came out high, and at a steep price only the very top wins: their
        accuracy, measured as such, scales their p before they are priced."""
        predicted, accepted = self._kept
        if predicted < KEPT_EVIDENCE:
            return 1.0
        return min(1.0, max(KEPT_TRUST_MIN, accepted / predicted))

    def step_price(self, rows: int, tokens: int) -> float:
        """The price of one step of `rows` rows verifying `tokens` tokens in all (the StepPrice's unit)."""
        rows = max(rows, 1)
        return self._price.cost(rows, tokens / rows)

    def _choose_nodes(self, proposals: list[list[_Node]], rows: int, drafting: int, extra: int) -> list[int]:
        """How many nodes of each row's proposal (best-first, each prefix a tree) the step verifies: the k most
        probable nodes over all rows, k maximising (drafting + sum of their p) / (price(rows, rows) +
        price(rows, rows + extra + k) - price(rows, rows + extra)): the prompt chunks' tokens are paid anyway and
        produce none of these rows' tokens, so they only raise the price of the nodes on top of them. Each row's list is non-increasing in p, so the k best nodes are a
        prefix of every row's list."""
        if self._price is None:
            return [len(p) for p in proposals]
        trust = self.kept_accuracy()
        merged = sorted(((n.p * trust, b) for b, nodes in enumerate(proposals) for n in nodes), key=lambda e: -e[0])
        # the decoding rows' share of the step: a plain step of the rows plus what the drafts add on top of the
        # prompt chunks (which the step runs anyway and which produce no token of these rows)
        plain, base = self.step_price(rows, rows), self.step_price(rows, rows + extra)
        gain, best, best_k = float(drafting), drafting / plain, 0
        for k, (p, _) in enumerate(merged, start=1):
            gain += p
            score = gain / (plain + self.step_price(rows, rows + extra + k) - base)
            if score > best:
                best, best_k = score, k
        keep = [0] * len(proposals)
        for _, b in merged[:best_k]:
            keep[b] += 1
        return keep

    def _proposal(self, request_id: int, context: Sequence[int], limit: int, rows: int = 1, extra: int = 0,
                  cut: bool = True) -> list[_Node]:
        """Up to `limit` nodes best-first by probability, trie, recycled and copy nodes merged (nodes of one token
        under one parent from several sources are one node, which carries every source's subtree); each node's
        probability is at most its parent's, so every prefix of the list is a tree. With a step price the list
        stops at a bucket boundary once the next bucket could not pay in a step of `rows` rows and `extra` other
        tokens where the other rows verify their roots only (the cheapest such step: `_choose_nodes` keeps no
        more), even if all its nodes were as likely as the last one (cut=False: a chain, priced by its length
        instead)."""
        req = self._requests.get(request_id)
        pool = req.pool if req is not None else None
        # the longest match, and the next shorter one that has continuations (more evidence, other tokens), in the
        # trie the request learns into; a pooled request also reads the shared trie (as another request would)
        matches = []
        for trie, rid in ((self.trie, request_id),) if pool is None else ((pool.trie, request_id), (self.trie, None)):
            max_q, found = self.config.max_query_length, 0
            while max_q > 0 and found < BACKOFF_MATCHES:
                q, evidence, nodes = trie.candidates(context, limit, rid, max_q)
                if not nodes:
                    break
                matches.append((q, evidence, nodes))
                found, max_q = found + 1, q - 1
        successors = self.successors if pool is None else pool.successors
        calib = self.calibration
        # the copy chain: what followed the longest earlier occurrence of the text's suffix (the automaton
        # follows begin_request and update; a context that does not end where it does gets no chain)
        chain, match_length = [], 0
        if req is not None and req.suffix.text and req.suffix.text[-1] == int(context[-1]):
            match_length = req.suffix.match_length
            chain = req.suffix.continuation(min(COPY_DEPTH, limit))
            req.copy_match = match_length
        chain_p = [1.0]  # chain_p[d]: every copied token up to the d-th accepted (grown as the chain is pushed)
        out: list[_Node] = []
        index_of: dict[tuple[int, int], int] = {}  # (parent index, token) -> index in out
        trie_at: list[list[int]] = [[] for _ in matches]  # per match: trie list index -> index in out
        # (-calibrated p, tie, source, parent, token, raw, key); source (match, trie list index) for a trie
        # node, (COPY, distance) for the copy chain's node, None for a recycled one
        heap: list[tuple] = []
        tie = 0

        def recycled_rank(parent: int, token: int) -> int | None:
            nxt = successors.get(out[parent].token if parent >= 0 else root, ())
            return nxt.index(token) if token in nxt[:len(RECYCLED_PRIOR)] else None

        def push(trie_i: int, parent: int, token: int, raw: float, key: tuple) -> None:
            nonlocal tie
            parent_p = out[parent].p if parent >= 0 else 1.0
            heapq.heappush(heap, (-min(parent_p, raw * calib.ratio(key), 1.0), tie, trie_i, parent, token, raw, key))
            tie += 1

        def push_trie(m: int, i: int) -> None:
            q, evidence, nodes = matches[m]
            token, trie_parent, raw = nodes[i]
            parent = trie_at[m][trie_parent] if trie_parent >= 0 else -1
            rank = recycled_rank(parent, token)
            if rank is None:
                push((m, i), parent, token, raw, calib.key("trie", q, evidence, raw))
            else:  # both sources name this token: they agree (noisy-or of the two)
                parent_raw = out[parent].raw if parent >= 0 else 1.0
                raw = 1.0 - (1.0 - raw) * (1.0 - parent_raw * RECYCLED_PRIOR[rank])
                push((m, i), parent, token, raw, calib.key("both", q, evidence, raw))

        def push_copy(d: int, parent: int) -> None:
            """The chain's node d tokens past the match end, under out[parent] (-1 = the root)."""
            nonlocal tie
            chain_p.append(chain_p[d - 1] * calib.copy_rate(match_length, d))
            parent_p = out[parent].p if parent >= 0 else 1.0
            heapq.heappush(heap, (-min(parent_p, chain_p[d]), tie, (COPY, d), parent, chain[d - 1], chain_p[d], None))
            tie += 1

        def push_recycled(parent: int) -> None:
            token, depth, parent_raw = (out[parent].token, out[parent].depth, out[parent].raw) if parent >= 0 else (
                root, 0, 1.0)
            if depth >= self.trie.branch_length:
                return
            for rank, nxt in enumerate(successors.get(token, ())[:len(RECYCLED_PRIOR)]):
                raw = parent_raw * RECYCLED_PRIOR[rank]
                push(None, parent, nxt, raw, calib.key("recycled", 0, 0, raw))

        root = int(context[-1])
        for m in range(len(matches)):
            push_trie(m, 0)
        if chain:
            push_copy(1, -1)
        push_recycled(-1)
        gain = 1.0
        if cut and self._price is not None:  # priced as _choose_nodes prices it, in the step where the other rows
            # verify their roots only; the bar to beat is that step without drafts (in the price's own unit)
            plain, base = self.step_price(rows, rows), self.step_price(rows, rows + extra)
            best = rows / plain
        while heap and len(out) < limit:
            neg_p, _, source, parent, token, raw, key = heapq.heappop(heap)
            existing = index_of.get((parent, token))
            if existing is None:
                index_of[(parent, token)] = len(out)
                out.append(_Node(token, parent, -neg_p, key, raw, out[parent].depth + 1 if parent >= 0 else 1))
                push_recycled(len(out) - 1)
            at = existing if existing is not None else len(out) - 1
            # (a node of another source that got here first takes this one's subtree)
            if source is not None and source[0] == COPY:
                d = source[1]
                out[at].copy = d
                if d < len(chain):
                    push_copy(d + 1, at)
            elif source is not None:
                m, i = source
                trie_at[m].append(at)
                if i + 1 < len(matches[m][2]):  # the match's next node (best-first) enters the race
                    push_trie(m, i + 1)
            if existing is not None:
                continue
            p = out[-1].p
            gain += p
            n = len(out)
            if cut and self._price is not None and n + 1 in TREE_BUCKETS and n + 1 < TREE_BUCKETS[-1]:
                best = max(best, (rows - 1 + gain) / (plain + self.step_price(rows, rows + extra + n) - base))
                nxt = bucket_size(n + 2)
                if (rows - 1 + gain + (nxt - 1 - n) * p) / (
                        plain + self.step_price(rows, rows + extra + nxt - 1) - base) < best:
                    break
        return out

    # ---- chains, for engines that verify one chain per row (vLLM) --------------------------------------------
    def token_cost(self, rows: int) -> float:
        """What one more verified token adds to a row's share of a one-token step of `rows` rows, relative:
        cost(rows, 2) / cost(rows, 1) - 1 (0 without a step price: tokens are free)."""
        return self._price.cost(rows, 2) / self._price.cost(rows, 1) - 1.0 if self._price is not None else 0.0

    def draft_chain(self, request_id: int, context_ids: Sequence[int], max_tokens: int,
                    rows: int = 1) -> tuple[list[int], list[float]]:
        """The next step's draft as one chain of at most max_tokens tokens, for engines that verify chains, not
        trees: the root-to-node path of the proposal with the highest expected accepted length (the sum of its
        nodes' calibrated probabilities). The step price at `rows` drafting rows cuts it: with c = cost(rows, 2) /
        cost(rows, 1) - 1 (what one more verified token adds to a row's share of a one-token step), the path
        maximising (1 + sum p) / (1 + c * length), ([], []) when none beats a plain step; without a price c = 0.
        Returns the tokens and their calibrated probabilities (non-increasing). Only context_ids' last
        max_query_length tokens are read."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an int >= 0 (the engine's draft length cap), got {max_tokens!r}")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be an int >= 1 (the rows drafting this step), got {rows!r}")
        if len(context_ids) == 0:
            raise ValueError("context_ids is empty: a row drafts after at least one committed token")
        # a chain of K tokens rarely needs the proposal's far branches: 2K + 8 best-first nodes hold it (and keep
        # host time per step small next to vLLM's CPU step)
        limit = min(self.config.decoding_length, 2 * max_tokens + 8)
        token_cost = self.token_cost(rows)
        nodes = self._proposal(request_id, context_ids, limit, cut=False) if max_tokens > 0 else []
        gains: list[float] = []  # expected accepted length of the path root .. node i
        best, best_score = -1, 1.0
        for i, node in enumerate(nodes):  # parents precede children
            gains.append(node.p + (gains[node.parent] if node.parent >= 0 else 0.0))
            if node.depth <= max_tokens:
                score = (1.0 + gains[i]) / (1.0 + token_cost * node.depth)
                if score > best_score:
                    best, best_score = i, score
        path: list[_Node] = []
        while best >= 0:
            path.append(nodes[best])
            best = nodes[best].parent
        path.reverse()
        if request_id in self._requests:  # calibration settles the chain against what the step commits
            from dataclasses import replace

            self._requests[request_id].sent = [replace(n, parent=i - 1, depth=i + 1) for i, n in enumerate(path)]
        return [n.token for n in path], [n.p for n in path]
