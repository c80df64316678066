"""Moved to lookahead.benchmarks.replay (this name is kept for docs/API.md's `from lookahead.replay import ...`)."""

from lookahead.benchmarks.replay import (COPY_HEAVY, CURVES, RECORDINGS, SHIPPED, RecordedModel, ReplayTotals,
                                         load_recording, record, replay)

__all__ = ["COPY_HEAVY", "CURVES", "RECORDINGS", "SHIPPED", "RecordedModel", "ReplayTotals", "load_recording",
           "record", "replay"]
