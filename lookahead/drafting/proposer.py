"""The one interface the engine drafts through. `Drafter` implements it; so do replay's peers
(`benchmarks.replay.SuffixDecodingDrafter`) and any drafter a user brings (`Engine(..., drafter=...)`); the vLLM
adapter (`integrations.vllm.LookaheadProposer`) drives a `Drafter` through it from vLLM's own calls."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Proposer(Protocol):
    """A request's life: `begin_request(id, prompt_ids, references)`, then `update(id, [first token])`, then per
    step `draft_batch` -> verify -> `update(id, committed tokens, predictions)`, then `end_request(id)`."""

    def begin_request(self, request_id, prompt_ids: Sequence[int], references=()) -> None:
        """Start drafting for a request: its prompt and reference token ids."""

    def update(self, request_id, new_tokens: Sequence[int], predictions: dict | None = None) -> None:
        """The tokens a step committed for the request (accepted drafts, then the bonus token); predictions:
        {token: the model's top-k next tokens} read off the step's verify logits."""

    def draft_batch(self, request_ids, contexts, batch_size: int | None = None,
                    extra_tokens: int = 0) -> list[tuple[list[int], list[int]]]:
        """One step's drafts, a (tokens, parents) tree per row in DFS pre-order (parents index the tree, 0 = the
        root, i.e. the row's last committed token); a None context is a row that takes no draft. The step carries
        batch_size rows and extra_tokens prompt tokens beside the drafts (what a size policy prices)."""

    def end_request(self, request_id) -> None:
        """Forget the request's per-request state (what it taught a shared pool stays)."""

    def running_requests(self) -> list:
        """The ids begun and not ended."""
