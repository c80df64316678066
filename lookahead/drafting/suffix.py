"""Suffix automaton of one request's text: the longest earlier occurrence of the text's current suffix, of any
length, and where it continues. The source of the drafter's deep copy chains (long verbatim copies from the
prompt, the references or the output itself).

The automaton is the classic one (Blumer et al.; every substring of the text is a path from the root, states are
end-position classes, at most 2n states and 3n transitions for n tokens). Appending a token is amortised O(1),
and the same walk yields the match: the longest suffix of text + [c] that occurs in text is len(p) + 1 for the
first state p on the suffix-link chain of the old last state that has a transition on c. So the current match
is kept as tokens arrive and a lookup never re-scans the text.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence


class SuffixAutomaton:
    """The automaton of a sequence of texts joined by separators (no match crosses a separator).

    match_length: length of the longest suffix of the text that also ends earlier in it (0 = none);
    match_end: the index where that earlier occurrence ends (-1 = none); the copy continues from match_end + 1.
    Memory: per state a length, a suffix link and a first end position (4-byte arrays) and a dict of
    transitions; per token one list slot (about 0.4 KB per token: docs/benchmarks.md#suffixautomaton).
    """

    def __init__(self):
        self.text: list[int] = []                  # the tokens; separators are negative
        self._len = array("i", [0])                # longest string of each state
        self._link = array("i", [-1])              # suffix link
        self._first = array("i", [-1])             # end index of the first occurrence of the state's strings
        self._next: list[dict[int, int]] = [{}]    # transitions
        self._last = 0                             # the state of the whole text
        self._separators = 0
        self.match_length = 0
        self.match_end = -1

    def __len__(self) -> int:
        return len(self.text)

    @property
    def states(self) -> int:
        return len(self._len)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens (ids >= 0). Amortised O(1) per token."""
        for token in tokens:
            token = int(token)
            if token < 0:
                raise ValueError(f"token ids must be >= 0, got {token} (negative ids are the separators)")
            self._append(token)

    def separate(self) -> None:
        """End the current text: what comes next is a new text that no match joins to this one."""
        self._separators += 1
        self._append(-self._separators)
        self.match_length, self.match_end = 0, -1

    def continuation(self, limit: int) -> list[int]:
        """Up to `limit` tokens after the match's earlier occurrence, stopping at a separator. A copy that reaches
        the text's end goes on copying what it drafted itself (a periodic text repeats its period)."""
        if self.match_length == 0 or limit <= 0:
            return []
        text, n = self.text, len(self.text)
        start = self.match_end + 1
        out = text[start:start + limit]
        for i, token in enumerate(out):
            if token < 0:
                return out[:i]
        for j in range(start + len(out), start + limit):  # past the end: the draft's own tokens, period n - start
            out.append(out[j - n])
        return out

    def _append(self, token: int) -> None:
        n = len(self.text)  # the index the token takes
        lens, link, first, nxt = self._len, self._link, self._first, self._next
        cur = len(lens)
        lens.append(lens[self._last] + 1)
        link.append(0)
        first.append(n)
        nxt.append({})
        p = self._last
        while p != -1 and token not in nxt[p]:
            nxt[p][token] = cur
            p = link[p]
        if p == -1:
            match_state, match_length = 0, 0
        else:
            q = nxt[p][token]
            if lens[p] + 1 == lens[q]:
                link[cur] = q
                match_state = q
            else:  # split q: the clone holds its strings up to len(p) + 1, which now also end at n
                clone = len(lens)
                lens.append(lens[p] + 1)
                link.append(link[q])
                first.append(first[q])
                nxt.append(dict(nxt[q]))
                while p != -1 and nxt[p].get(token) == q:
                    nxt[p][token] = clone
                    p = link[p]
                link[q] = link[cur] = clone
                match_state = clone
            match_length = lens[match_state]
        # the earlier occurrence to copy from: keep following the one being copied while it goes on (it matches
        # the whole new suffix, as the match grows by at most one token), else the class's first occurrence
        end = self.match_end
        if token < 0 or match_length == 0:
            self.match_end = -1
        elif 0 <= end and end + 1 < n and self.text[end + 1] == token:
            self.match_end = end + 1
        else:
            self.match_end = first[match_state]
        self.match_length = match_length if token >= 0 else 0
        self.text.append(token)
        self._last = cur
