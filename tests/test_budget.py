"""The adaptive draft budget: expected tokens/s over a cost curve and running acceptance."""

from lookahead.budget import DraftBudget

# a CPU-like curve: verify cost grows with the nodes
CURVE = {1: 1.0, 2: 1.2, 4: 1.3, 8: 1.5, 16: 2.0, 32: 3.0, 64: 5.0}


def budget_after(accepted_of, steps=2000) -> DraftBudget:
    budget = DraftBudget(CURVE, max_draft=63, stats={})
    for _ in range(steps):
        b = budget.choose(1)
        budget.update(b, accepted_of(b), b)
    return budget


def test_drafts_that_are_never_accepted_fall_back_to_plain_steps():
    budget = budget_after(lambda b: 1)
    assert budget.choose(1) == 0
    # most steps are plain; the optimism bonus still re-tries drafts (measured: 1373 plain of 2000 steps), the
    # exploration cost the README reports for new text such as the writing category
    assert budget.stats[0][0] > 1200


def test_drafts_that_pay_are_taken():
    # acceptance grows with the draft: 15 nodes give 6 tokens for 2x the cost of a plain step
    budget = budget_after(lambda b: 1 + min(b, 15) // 3)
    assert budget.choose(1) == 15


def test_cost_interpolates_and_extrapolates():
    budget = DraftBudget(CURVE, max_draft=63, stats={})
    assert budget.cost(1) == 1.0 and budget.cost(3) == 1.25 and budget.cost(128) == 9.0
    assert budget.candidates == [0, 1, 3, 7, 15, 31, 63]
