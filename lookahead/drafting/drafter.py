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
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lookahead.config import LookaheadConfig
from lookahead.drafting.pools import DraftPools, Pool
from lookahead.drafting.suffix import SuffixAutomaton
from lookahead.drafting.tree import TREE_BUCKETS
from lookahead.drafting.tree import DraftTree, draft_tree, preorder
from lookahead.drafting.trie import TokenTrie

# Prior probability that the model's rank-r next token (from its latest verify) is what it produces next time,
# from the shipped recording (docs/benchmarks.md#recycled_prior); calibration refines it.
RECYCLED_PRIOR = (0.35, 0.08, 0.04, 0.025, 0.015, 0.01, 0.008, 0.006)
# Trie matches drafted from: the longest, and the next shorter one with continuations (replay:
# docs/benchmarks.md#backoff_matches).
BACKOFF_MATCHES = 2
# The kept nodes' own accuracy (Drafter.kept_accuracy): the decay per settled step, the predicted p it needs before
# it counts, and the least it may scale p by.
KEPT_DECAY = 0.99
KEPT_EVIDENCE = 20.0
KEPT_TRUST_MIN = 0.25
P_BINS = (0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # upper edges; the last bin is 1
# Copy chains: the deepest a chain runs (docs/benchmarks.md#copy_depth), and the prior probability that a copied
# token is accepted given its parent was, per match length bin (1, 2, 3-4, 5-8, 9-16, 17-32, 33+ tokens), set
# below the observed rates so a chain earns its depth (docs/benchmarks.md#copy_prior).
COPY_DEPTH = 64
COPY = -1  # the copy chain's tag where trie nodes carry their match's index
COPY_PRIOR = (0.15, 0.3, 0.45, 0.6, 0.7, 0.8, 0.85)
COPY_PRIOR_MASS = 4.0  # pseudo-trials of the prior


class DecayedRatio:
    """Two running sums, of `num` and of `den`, each older sample weighted by `decay` per newer one; `ratio` is
    their quotient: a decayed average of num per den. The drafter's calibration and kept accuracy, the learned step
    costs and the drafting gate all keep their averages in it."""

    __slots__ = ("decay", "num", "den")

    def __init__(self, decay: float):
        self.decay, self.num, self.den = decay, 0.0, 0.0

    def add(self, num: float, den: float) -> None:
        self.num = self.num * self.decay + num
        self.den = self.den * self.decay + den

    def ratio(self, prior_num: float = 0.0, prior_den: float = 0.0) -> float | None:
        """(num + prior_num) / (den + prior_den), None while that denominator is 0."""
        den = self.den + prior_den
        return (self.num + prior_num) / den if den > 0 else None


# ---- the step price the size policy asks ------------------------------------------------------------------
class StepPrice(Protocol):
    """The one interface a `Drafter` prices drafts with: `cost(rows, tokens)`, the cost of one step of `rows` rows
    that each verify a tree of `tokens` nodes (root included; 1 = a plain step), in any unit (only ratios are
    used). `CostModel` (a fixed batch-1 curve: replay, a bare Drafter), `StepCost` (learned from an engine's
    steps) and the vLLM proposer's linear step model implement it."""

    def cost(self, rows: int, tokens: int) -> float: ...


class CostModel:
    """A verify cost curve {tree nodes: cost}, in seconds or relative, priced relative to one token."""

    def __init__(self, curve: Mapping[int, float]):
        if not curve or any(int(T) < 1 or not float(c) > 0 for T, c in curve.items()):
            raise ValueError(f"a cost curve maps tree sizes >= 1 to costs > 0, got {dict(curve)!r}")
        self.sizes = sorted(int(T) for T in curve)
        base = float(curve[1]) if 1 in curve else float(curve[self.sizes[0]])
        self.rel = [float(curve[T]) / base for T in self.sizes]

    def __call__(self, nodes: float) -> float:
        """Relative cost of a verify over `nodes` tree nodes (all rows), linear between and beyond the points."""
        xs, ys = self.sizes, self.rel
        if nodes <= xs[0] or len(xs) == 1:
            return ys[0] if nodes <= xs[0] else ys[0] * nodes / xs[0]
        for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
            if nodes <= x1:
                return y0 + (y1 - y0) * (nodes - x0) / (x1 - x0)
        return ys[-1] + (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) * (nodes - xs[-1])

    def cost(self, rows: int, tokens: int) -> float:
        """Relative cost of one step of `rows` rows that each verify a tree of `tokens` nodes (1, 1 = a plain
        one-row step). A batch-1 curve can only price the rows x tokens nodes as one row's."""
        return self(rows * tokens)

    def costs(self, rows: int, tokens: list[float]) -> list[float]:
        """cost(rows, t) for every t, in one call (the drafter prices a step's candidate sizes at once)."""
        return [self.cost(rows, t) for t in tokens]


class StepCost:
    """c(B, N): seconds of one engine step over B rows that verify N tokens in all (each row its own tree, its root
    included, and any prompt chunk riding in the step; B = N: a plain step), learned from the engine's own steps.
    `cost(rows, tokens)` takes the tokens per row (the StepPrice interface; N = rows x tokens, any real number).

    Every step the engine runs is a sample (`observe`): a (B, N) seen before is priced by its decayed mean
    (recent steps weigh most, so the model follows the machine: graphs on or off, load, heat). An unseen one is
    priced linearly between the nearest seen sizes of the same B, else by the prior, a batch-1 curve priced at N
    tokens, in the units of the nearest seen (B, N) (nearest in log B, then log N): the prior gives the shape, the
    steps the scale, so a batch's B rows that a batch-1
    curve underprices (attention per row over its own context) are corrected as soon as steps of that B have
    run. `cost(B, N / B)` is what `Drafter` calls."""

    def __init__(self, prior: Mapping[int, float], decay: float = 0.9):
        self.source = prior  # the curve it started from (a new one starts a new model)
        self.prior = CostModel(prior)
        self.decay = decay
        self.seen: dict[tuple[int, int], DecayedRatio] = {}  # (B, N) -> seconds per step
        self._priced: dict[tuple[int, int], float] = {}  # cost()'s answers since the last observe

    def observe(self, rows: int, nodes: float, seconds: float) -> None:
        """A step of `rows` rows that verified `nodes` tokens per row (rows x nodes in all) took `seconds`."""
        if seconds > 0:
            key = (rows, max(1, round(rows * nodes)))
            entry = self.seen.get(key)
            if entry is None:
                entry = self.seen[key] = DecayedRatio(self.decay)
            entry.add(seconds, 1.0)
            self._priced.clear()

    def costs(self, rows: int, tokens: list[float]) -> list[float]:
        """cost(rows, t) for every t, in one call (the drafter prices a step's candidate sizes at once)."""
        return [self.cost(rows, t) for t in tokens]

    def cost(self, rows: int, tokens: float) -> float:
        key = (rows, max(1, round(rows * tokens)))
        price = self._priced.get(key)
        if price is None:
            price = self._priced[key] = self._price(*key)
        return price

    def _price(self, rows: int, total: int) -> float:
        entry = self.seen.get((rows, total))
        if entry is not None:
            return entry.ratio()
        # between two seen sizes of the same row count: linear between them (the steps' own slope, which a
        # batch-1 prior underprices once the rows' tokens make the step compute-bound)
        below = max((n for r, n in self.seen if r == rows and n < total), default=None)
        above = min((n for r, n in self.seen if r == rows and n > total), default=None)
        if below is not None and above is not None:
            lo, hi = self._mean(rows, below), self._mean(rows, above)
            return lo + (hi - lo) * (total - below) / (above - below)
        prior = self.prior(total)
        if not self.seen:
            return prior
        # a plain step (one token a row) is priced from plain steps, a drafting one from drafting ones, where seen:
        # a step with trees also runs acceptance and compaction, and its cells are the ones the policy compares
        plain = total == rows
        kind = [k for k in self.seen if (k[1] == k[0]) == plain] or list(self.seen)
        near = min(kind, key=lambda k: (abs(math.log(k[0] / rows)), abs(math.log(k[1] / total))))
        return prior * self._mean(*near) / self.prior(near[1])

    def _mean(self, rows: int, total: int) -> float:
        return self.seen[rows, total].ratio()


def _tokens_per_cost(tokens: float, plain: float, priced: float, base: float) -> float:
    """The size policy's score: expected tokens over the decoding rows' share of the step, a plain step plus what
    the drafts (priced: the step with them) add on top of the prompt chunks (base: the step without them)."""
    return tokens / (plain + priced - base)


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
    stats: dict[tuple[str, int, int, int], DecayedRatio] = field(default_factory=dict)  # observed per predicted
    # copy chains: (match length bin, distance bin) -> accepted per trial, a trial = the parent was accepted
    copy: dict[tuple[int, int], DecayedRatio] = field(default_factory=dict)

    @staticmethod
    def key(source: str, q: int, evidence: int, p: float) -> tuple[str, int, int, int]:
        return source, _match_bin(q), _evidence_bin(evidence), bisect.bisect_left(P_BINS, p)

    def ratio(self, key: tuple[str, int, int, int]) -> float:
        entry = self.stats.get(key)
        return 1.0 if entry is None else entry.ratio(self.prior, self.prior)

    def observe(self, key: tuple[str, int, int, int], p: float, accepted: bool) -> None:
        entry = self.stats.get(key)
        if entry is None:
            entry = self.stats[key] = DecayedRatio(self.decay)
        entry.add(float(accepted), p)

    def copy_rate(self, match_length: int, distance: int) -> float:
        """Probability that a copy chain's node `distance` tokens past the end of a `match_length`-token match is
        accepted, given that its parent was."""
        m = _log2_bin(match_length)
        entry = self.copy.get((m, _log2_bin(distance)))
        prior = COPY_PRIOR_MASS * COPY_PRIOR[m]
        return prior / COPY_PRIOR_MASS if entry is None else entry.ratio(prior, COPY_PRIOR_MASS)

    def observe_copy(self, match_length: int, distance: int, accepted: bool) -> None:
        key = (_log2_bin(match_length), _log2_bin(distance))
        entry = self.copy.get(key)
        if entry is None:
            entry = self.copy[key] = DecayedRatio(self.decay)
        entry.add(float(accepted), 1.0)


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
    price, anything with `cost(rows, tokens)` (`lookahead.engine.pricing.StepPrice`: the engine's learned `StepCost`,
    replay's `CostModel`, the vLLM proposer's linear step); neither = draft up to decoding_length nodes every step
    (no size policy).
    trie: a TokenTrie to share (model.trie in generate), whose branch_length must be the config's; None = a new
    one.
    calibration, successors: what the drafter learns besides the trie (acceptance statistics; the model's latest
    top-k next tokens per token), to keep across drafters (model.state's in generate); None = new ones.
    pools: the drafting pools (`lookahead.drafting.pools`, docs/tenants.md) of requests begun with a pool key, to keep across
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
        self._kept = DecayedRatio(KEPT_DECAY)  # over the verified nodes: accepted per calibrated p

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
            self._kept.add(sum(correct), sum(n.p for n in req.sent))
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
        return [preorder([(n.token, n.parent) for n in nodes])
                for nodes in self._kept_nodes(request_ids, contexts, batch_size, extra_tokens)]

    def draft_trees(self, request_ids: Sequence[int], contexts: Sequence[Sequence[int] | None],
                    batch_size: int | None = None, extra_tokens: int = 0) -> list[DraftTree | None]:
        """draft_batch's drafts as the rows' trees (`DraftTree`, root = the context's last token, in the
        config's layout); None for a None context."""
        layout = self.config.layout
        return [None if ctx is None else draft_tree(int(ctx[-1]), [(n.token, n.parent) for n in nodes], layout)
                for ctx, nodes in zip(contexts, self._kept_nodes(request_ids, contexts, batch_size, extra_tokens))]

    def _kept_nodes(self, request_ids, contexts, batch_size, extra_tokens) -> list[list[_Node]]:
        """Every row's proposal cut to the nodes the step's price keeps (remembered to settle at `update`)."""
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
            out.append(nodes)
        return out

    def kept_accuracy(self) -> float:
        """Accepted over predicted (sum of calibrated p) of the nodes the policy kept lately, in [KEPT_TRUST_MIN, 1]
        (1 until KEPT_EVIDENCE nodes' worth of p were kept). The calibration is per bin; the nodes that win the
        step's selection are the ones whose p came out high, and at a steep price only the very top wins: their
        accuracy, measured as such, scales their p before they are priced."""
        if self._kept.den < KEPT_EVIDENCE:
            return 1.0
        return min(1.0, max(KEPT_TRUST_MIN, self._kept.ratio()))

    def step_price(self, rows: int, tokens: int) -> float:
        """The price of one step of `rows` rows verifying `tokens` tokens in all (the StepPrice's unit)."""
        return self.step_prices(rows, [tokens])[0]

    def step_prices(self, rows: int, totals: Sequence[int]) -> list[float]:
        """step_price at several totals, asked of the price in one call where it takes them (`costs`)."""
        rows = max(rows, 1)
        costs = getattr(self._price, "costs", None)
        per_row = [t / rows for t in totals]
        return costs(rows, per_row) if costs is not None else [self._price.cost(rows, t) for t in per_row]

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
        plain, base, *priced = self.step_prices(rows, [rows, rows + extra] +
                                                [rows + extra + k for k in range(1, len(merged) + 1)])
        gain, best, best_k = float(drafting), drafting / plain, 0
        for k, (p, _) in enumerate(merged, start=1):
            gain += p
            score = _tokens_per_cost(gain, plain, priced[k - 1], base)
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
            matches += trie.matches(context, limit, rid, self.config.max_query_length, BACKOFF_MATCHES)
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
            plain, base = self.step_prices(rows, [rows, rows + extra])
            best = rows / plain
            price_at = {}  # draft nodes -> the step's price with them, asked only where the list reaches

            def priced(n: int) -> float:
                if n not in price_at:
                    price_at[n] = self.step_price(rows, rows + extra + n)
                return price_at[n]
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
                if matches[m][2].has(i + 1):  # the match's next node (best-first) enters the race
                    push_trie(m, i + 1)
            if existing is not None:
                continue
            p = out[-1].p
            gain += p
            n = len(out)
            if cut and self._price is not None and n + 1 in TREE_BUCKETS and n + 1 < TREE_BUCKETS[-1]:
                best = max(best, _tokens_per_cost(rows - 1 + gain, plain, priced(n), base))
                nxt = TREE_BUCKETS[bisect.bisect_left(TREE_BUCKETS, n + 2)]  # the next bucket
                if _tokens_per_cost(rows - 1 + gain + (nxt - 1 - n) * p, plain, priced(nxt - 1), base) < best:
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
