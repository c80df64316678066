"""SuffixAutomaton: golden matches on hand-built strings, agreement with a brute-force search, and its memory."""

import random
import tracemalloc

import pytest

from lookahead.drafting.suffix import SuffixAutomaton


def brute_match_length(text: list[int]) -> int:
    """Longest suffix of text that also ends earlier in it (separators, < 0, never match)."""
    n = len(text)
    best = 0
    for length in range(1, n):
        suffix = text[n - length:]
        if any(t < 0 for t in suffix):
            break
        if any(text[e - length + 1:e + 1] == suffix for e in range(length - 1, n - 1)):
            best = length
    return best


def automaton(*texts: list[int]) -> SuffixAutomaton:
    sam = SuffixAutomaton()
    for i, text in enumerate(texts):
        if i:
            sam.separate()
        sam.extend(text)
    return sam


def test_golden_longest_match_and_continuation():
    #               0  1  2  3  4  5  6  7  8  9
    sam = automaton([5, 6, 7, 8, 9, 1, 5, 6, 7])
    assert (sam.match_length, sam.match_end) == (3, 2)  # [5, 6, 7] ended at 2 before
    assert sam.continuation(4) == [8, 9, 1, 5]
    assert sam.continuation(9) == [8, 9, 1, 5, 6, 7, 8, 9, 1]  # past the end it copies its own draft
    sam.extend([8])  # the copy goes on: the match grows and keeps following the same occurrence
    assert (sam.match_length, sam.match_end) == (4, 3) and sam.continuation(2) == [9, 1]
    sam.extend([2])  # the copy breaks: nothing ended in [.., 8, 2] before, nor [2]
    assert (sam.match_length, sam.match_end) == (0, -1) and sam.continuation(8) == []
    sam.extend([9])  # [9] occurred at 4 (not [2, 9])
    assert (sam.match_length, sam.match_end) == (1, 4) and sam.continuation(3) == [1, 5, 6]


def test_golden_match_of_any_length():
    doc = list(range(100, 180))  # an 80-token document, then a verbatim copy of it
    sam = automaton(doc + [1, 2] + doc[:70])
    assert (sam.match_length, sam.match_end) == (70, 69)
    assert sam.continuation(64) == doc[70:] + [1, 2] + doc[:52]
    assert brute_match_length(sam.text) == 70


def test_a_periodic_text_copies_itself():
    sam = automaton([3, 4, 3, 4, 3, 4, 3])
    assert sam.match_length == 5 and sam.continuation(3) == [4, 3, 4]


def test_separators_end_matches_and_continuations():
    sam = automaton([1, 2, 3], [1, 2])  # a reference, then the prompt
    assert (sam.match_length, sam.match_end) == (2, 1) and sam.continuation(8) == [3]
    sam = automaton([1, 2], [7, 1, 2])
    assert sam.continuation(8) == []  # [1, 2] continues with the separator only
    sam = automaton([4, 1], [2, 5])
    assert sam.match_length == 0  # [1, 2] spans the separator: no match
    with pytest.raises(ValueError, match="must be >= 0"):
        sam.extend([-3])


def test_agrees_with_brute_force_on_random_texts():
    rng = random.Random(0)
    for trial in range(60):
        sam = SuffixAutomaton()
        vocab = rng.choice([2, 3, 5, 20])
        for step in range(rng.randint(1, 120)):
            if rng.random() < 0.03:
                sam.separate()
            else:
                sam.extend([rng.randrange(vocab)] if rng.random() < 0.7 else
                           [rng.randrange(vocab) for _ in range(rng.randint(2, 6))])
            text = sam.text
            assert sam.match_length == brute_match_length(text), (trial, step)
            if sam.match_length:
                m, e = sam.match_length, sam.match_end
                assert e < len(text) - 1 and text[e - m + 1:e + 1] == text[len(text) - m:]
        assert sam.states <= max(2 * len(sam), 1)


def test_memory_is_linear_and_bounded():
    """A 32k-token request of text-like tokens (Zipf-distributed over a 49k vocabulary, with copied spans)."""
    rng = random.Random(1)
    words = list(range(49152))
    weights = [1.0 / (r + 1) for r in range(len(words))]
    text = []
    while len(text) < 32768:
        if text and rng.random() < 0.1:  # a verbatim copy of an earlier span
            start = rng.randrange(len(text))
            text += text[start:start + rng.randint(5, 200)]
        else:
            text += rng.choices(words, weights, k=50)
    text = text[:32768]
    tracemalloc.start()
    sam = SuffixAutomaton()
    sam.extend(text)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sam.states <= 2 * len(text)
    assert size < 16 * 2**20, f"{size / 2**20:.1f} MB for 32k tokens"  # measured 2026-11-26: see the notes
