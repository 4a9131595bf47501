"""bench/RESULTS.md's sections: one replaced in place, the others kept, a new one appended."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.results import RESULTS, replace_section, write_section

pytestmark = pytest.mark.fast


def test_replacing_each_section_with_itself_changes_nothing() -> None:
    document = RESULTS.read_text()
    sections = re.split(r"\n(?=## )", document)[1:]
    assert len(sections) >= 5
    for text in sections:
        heading = text.splitlines()[0]
        assert replace_section(document, heading, text) == document, heading


def test_one_section_replaced_the_others_kept_and_a_new_one_appended(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    write_section("## A", "## A\n\nfirst\n", path)
    write_section("## B", "## B\n\nsecond\n", path)
    write_section("## A", "## A\n\nnew\n", path)
    assert path.read_text() == "# Benchmark results\n\n## A\n\nnew\n\n## B\n\nsecond\n"
    # A heading that only starts like another is a different section.
    write_section("## A b", "## A b\n\nthird\n", path)
    assert path.read_text().endswith("## B\n\nsecond\n\n## A b\n\nthird\n")
