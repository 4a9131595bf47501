"""bench/RESULTS.md: each benchmark's section replaced in place (or appended), the others
left as they are. Every benchmark script writes its table through `write_section`."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_section(document: str, section: str, text: str) -> str:
    """`document` with the section headed by the line `section` (up to the next `## `
    heading) replaced by `text`, which starts with that heading; appended when absent."""
    document = document or "# Benchmark results\n"
    start = document.find(f"\n{section}\n")
    if start == -1:
        return document.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    end = document.find("\n## ", start + 1)
    after = document[end + 1 :] if end != -1 else ""
    updated = document[: start + 1] + text.rstrip("\n") + "\n" + ("\n" + after if after else "")
    return updated.rstrip("\n") + "\n"


def write_section(section: str, text: str, path: Path = RESULTS) -> None:
    existing = path.read_text() if path.is_file() else ""
    path.write_text(replace_section(existing, section, text))
