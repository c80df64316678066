"""Moved: the step price lives beside the drafter that asks it (lookahead.drafting.drafter), its measurement in
lookahead.engine.pricing (this name is kept for docs/API.md's `from lookahead.cost import CostModel`)."""

from lookahead.drafting.drafter import CostModel, StepCost, StepPrice
from lookahead.engine.pricing import DraftGate, calibrate, curve_key, prior_curve

__all__ = ["CostModel", "DraftGate", "StepCost", "StepPrice", "calibrate", "curve_key", "prior_curve"]
