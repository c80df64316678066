"""Prompts: the shipped Spec-Bench questions, their selection, and the one way text becomes prompt ids.

`spec_bench/question.jsonl` is Spec-Bench's question set (Xia et al., 2024; 480 questions in 13 categories),
shipped with its Apache-2.0 `LICENSE` so an installed package finds it without a checkout beside it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def spec_bench_path() -> Path:
    """The packaged Spec-Bench question.jsonl."""
    return _HERE / "spec_bench" / "question.jsonl"


def read_first_turns(path: str | Path) -> list[tuple[str, str]]:
    """(category, first turn) of every line of a JSONL of prompts, in file order: Spec-Bench rows
    {"category", "turns": [...]} or rows {"prompt", "category"?} (category "all" when missing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}: pass the path of a JSONL of prompts")
    items = []
    for n, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{n + 1} is not JSON") from None
        row = row if isinstance(row, dict) else {}
        turns = row.get("turns")
        text = row.get("prompt", turns[0] if isinstance(turns, list) and turns else None)
        if not isinstance(text, str):
            raise ValueError(f"{path}:{n + 1} has neither a 'prompt' string nor a 'turns' list")
        items.append((str(row.get("category", "all")), text))
    return items


def round_robin(items: list[tuple[str, object]], per_category: int | None = None,
                categories: list[str] | None = None) -> list[tuple[str, object]]:
    """The first `per_category` items of every category (all when None), interleaved rank by rank in the
    categories' order of first appearance, so any prefix of the result covers the categories evenly.
    `categories` keeps only those (ValueError for one the items do not have)."""
    by_category: dict[str, list] = defaultdict(list)
    for category, item in items:
        by_category[category].append(item)
    if categories:
        unknown = sorted(set(categories) - set(by_category))
        if unknown:
            raise ValueError(f"unknown categories {', '.join(unknown)}; available: {', '.join(by_category)}")
        by_category = {c: v for c, v in by_category.items() if c in categories}
    depth = max((len(v) for v in by_category.values()), default=0)
    if per_category is not None:
        if per_category < 0:
            raise ValueError(f"per_category must be >= 0, got {per_category}")
        depth = min(depth, per_category)
    return [(c, v[rank]) for rank in range(depth) for c, v in by_category.items() if rank < len(v)]


def spec_bench_first_turns(per_category: int | None, categories: list[str] | None = None,
                           path: str | Path | None = None) -> list[tuple[str, str]]:
    """(category, first turn) of the first `per_category` questions of every category (all when None),
    round-robin over the categories: the selection the CLI, the benchmarks, the tests and the GPU runs share.
    `path`: another question.jsonl (default: the packaged one)."""
    return round_robin(read_first_turns(path or spec_bench_path()), per_category, categories)


def encode_chat(tokenizer, messages: list[dict[str, str]]):
    """Token ids [1, T] of a conversation ([{"role", "content"}, ...]) through the tokenizer's chat template,
    ending with the generation prompt of the assistant's next turn."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def encode_prompt(tokenizer, text: str, chat: bool):
    """Token ids [1, T] of a prompt: one user turn through the chat template when chat, else the raw text."""
    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(text, return_tensors="pt").input_ids
