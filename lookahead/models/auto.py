"""Pick the model class that serves a checkpoint's model_type."""

from __future__ import annotations

from pathlib import Path

from lookahead.models.checkpoint import load_config
from lookahead.models.llama import LlamaForLookahead


def model_classes() -> list[type]:
    from lookahead.models import glm

    return [LlamaForLookahead, glm.GlmForLookahead]


def model_class(path: Path) -> type:
    """The class whose model_types include the checkpoint's config.json model_type."""
    model_type = load_config(path)["model_type"]
    classes = model_classes()
    for cls in classes:
        if model_type in cls.model_types:
            return cls
    served = sorted(t for cls in classes for t in cls.model_types)
    raise ValueError(f"model_type {model_type!r} is not served; supported: {', '.join(served)}")
