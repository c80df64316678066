"""docs/API.md, the contract: every `>>>` example in it runs (CPU, the embedded model, no network)."""

import doctest
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[1] / "docs" / "API.md"


@pytest.mark.slow
def test_every_example_of_the_api_document_runs():
    results = doctest.testfile(str(API), module_relative=False, optionflags=doctest.ELLIPSIS, verbose=False)
    assert results.attempted >= 40 and results.failed == 0


def test_the_readme_and_the_package_point_at_the_document_inside_the_repository():
    root = API.parents[1]
    assert "docs/API.md" in (root / "README.md").read_text()
    for path in [root / "README.md", *sorted((root / "lookahead").rglob("*.py"))]:
        assert "shared/API.md" not in path.read_text(), path
