"""The one writer of a benchmark's results: `{out}/{stem}.json` (everything measured), `.md` (the table) and `.png`
(the figure), the same three files for every benchmark."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_report(out: Path | str, stem: str, record: dict, markdown: str, draw: Callable | None = None,
                 dpi: int = 110) -> None:
    """Write the record as JSON and the markdown table; with `draw` and matplotlib installed also the figure:
    draw(plt) makes it and returns it (pyplot with the Agg backend, no screen needed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (out / f"{stem}.md").write_text(markdown.rstrip("\n") + "\n")
    if draw is None:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the bench extra is not installed: JSON and markdown only
        return
    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=dpi)
    plt.close(fig)
