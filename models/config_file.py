"""Editing `serving.api_keys` in a config file's text: an entry added or revoked in place.

A person wrote the file: rewriting it from the parsed YAML would lose its comments, order
and quoting. So the edit inserts or changes only the lines of one entry, then parses the
result back and accepts it only if it equals the old file's content with exactly that change
(anything else, say a layout these line edits do not understand, is a `ConfigEditError` and
nothing is written). `write_config_text` then replaces the file in one step.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

_SERVING = re.compile(r"^serving\s*:(?P<rest>.*)$")
_API_KEYS = re.compile(r"^api_keys\s*:(?P<rest>.*)$")
_NOTHING = re.compile(r"^\s*(#.*)?$")
_EMPTY_LIST = re.compile(r"^\s*\[\s*\]\s*(#.*)?$")
_SHA256_LINE = r"^(?P<lead>\s*(?:-\s+)?)sha256\s*:\s*(?P<q>['\"]?){hex}(?P=q)\s*(#.*)?$"
_REVOKED_LINE = re.compile(r"^(?P<lead>\s*(?:-\s+)?)revoked\s*:\s*[^\s#]*")
_FLOW_REVOKED = re.compile(r"(?P<key>\brevoked\s*:\s*)[^\s,}#]+")


class ConfigEditError(ValueError):
    """The file cannot be changed safely by this edit; nothing was written."""


def add_api_key_entry(text: str, entry: Mapping[str, Any]) -> str:
    """`text` with `entry` appended to `serving.api_keys` (the section and the list are
    created when missing)."""
    raw = _parse(text)
    serving = raw.get("serving") or {}
    keys = serving.get("api_keys") if isinstance(serving, dict) else None
    if not isinstance(serving, dict) or not isinstance(keys, list | None):
        raise ConfigEditError("serving.api_keys is not a list inside a serving mapping")
    expected = {**raw, "serving": {**serving, "api_keys": [*(keys or []), dict(entry)]}}

    lines = _lines(text)
    block = _serving_block(lines)
    if block is None:
        edited = [*lines, "serving:\n", "  api_keys:\n", *_entry_lines(entry, 4)]
    else:
        start, end = block
        child = next((line for line in lines[start + 1 : end] if _is_content(line)), None)
        indent = _indent(child) if child is not None else 2
        at = next(
            (
                i
                for i in range(start + 1, end)
                if _is_content(lines[i])
                and _indent(lines[i]) == indent
                and _API_KEYS.match(lines[i][indent:])
            ),
            None,
        )
        header = [" " * indent + "api_keys:\n"]
        if at is None:
            new = [*header, *_entry_lines(entry, indent + 2)]
            edited = [*lines[: start + 1], *new, *lines[start + 1 :]]
        else:
            match = _API_KEYS.match(lines[at][indent:].rstrip("\n"))
            rest = match["rest"] if match else ""
            if _EMPTY_LIST.match(rest):
                new = [*header, *_entry_lines(entry, indent + 2)]
                edited = [*lines[:at], *new, *lines[at + 1 :]]
            elif _NOTHING.match(rest):
                last, items_indent = _list_extent(lines, at, end, indent)
                new = _entry_lines(entry, indent + 2 if items_indent is None else items_indent)
                edited = [*lines[: last + 1], *new, *lines[last + 1 :]]
            else:
                raise ConfigEditError("serving.api_keys is written on one line (flow style)")
    return _verified("".join(edited), expected)


def revoke_api_key_entries(text: str, sha256: str) -> str:
    """`text` with `revoked: true` on every entry of `serving.api_keys` whose digest is
    `sha256` (in any case)."""
    digest = sha256.lower()
    raw = _parse(text)
    serving = raw.get("serving")
    keys = serving.get("api_keys") if isinstance(serving, dict) else None
    if not isinstance(keys, list):
        raise ConfigEditError("the file has no serving.api_keys list")
    expected = copy.deepcopy(raw)
    found = False
    for key in expected["serving"]["api_keys"]:
        if isinstance(key, dict) and str(key.get("sha256", "")).lower() == digest:
            key["revoked"] = True
            found = True
    if not found:
        raise ConfigEditError(f"serving.api_keys has no entry with sha256 {digest[:8]}…")

    lines = _lines(text)
    block = _serving_block(lines)
    if block is None:
        raise ConfigEditError("serving is not a block of its own lines")
    start, end = block
    sha_line = re.compile(_SHA256_LINE.format(hex=re.escape(digest)), re.IGNORECASE)
    hits = [i for i in range(start + 1, end) if digest in lines[i].lower()]
    for i in reversed(hits):
        match = sha_line.match(lines[i].rstrip("\n"))
        if match:
            _revoke_block_entry(lines, i, end, len(match["lead"]))
        elif "{" in lines[i]:
            lines[i] = _revoke_flow_entry(lines[i])
        else:
            raise ConfigEditError(f"line {i + 1} names the key in a layout this edit cannot change")
    return _verified("".join(lines), expected)


def write_config_text(path: Path, text: str) -> None:
    """Replace the file (through a symlink, the file it names) with `text` in one step, so
    that a reader sees the old file or the new one, never half of one; its mode is kept."""
    target = path.resolve()
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o644
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _parse(text: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigEditError(f"the file is not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigEditError("the file must hold a mapping at the top level")
    return raw


def _verified(text: str, expected: dict[str, Any]) -> str:
    if _parse(text) != expected:
        raise ConfigEditError(
            "the file's layout is not one this edit understands (the result would differ "
            "in more than serving.api_keys)"
        )
    return text


def _lines(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return lines


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_content(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _serving_block(lines: list[str]) -> tuple[int, int] | None:
    """(index of the top-level `serving:` line, index after its block), None without one."""
    for start, line in enumerate(lines):
        match = _SERVING.match(line.rstrip("\n"))
        if match is None:
            continue
        if not _NOTHING.match(match["rest"]):
            raise ConfigEditError("serving is written on one line (flow style)")
        end = start + 1
        while end < len(lines) and (not _is_content(lines[end]) or _indent(lines[end]) > 0):
            end += 1
        return start, end
    return None


def _list_extent(lines: list[str], at: int, end: int, indent: int) -> tuple[int, int | None]:
    """The last line of the block list that starts after line `at` (the `api_keys:` line at
    `indent`), and the indent of its items (None: no items)."""
    last, items_indent = at, None
    for i in range(at + 1, end):
        line = lines[i]
        if not _is_content(line):
            continue
        here = _indent(line)
        if here < indent or (here == indent and not line[here:].startswith("-")):
            break
        if items_indent is None and line[here:].startswith("-"):
            items_indent = here
        last = i
    return last, items_indent


def _entry_lines(entry: Mapping[str, Any], indent: int) -> list[str]:
    """`entry` as one block-style list item; PyYAML quotes what would not read back as the
    same string (a name like `yes`, a digest that looks like a number)."""
    dumped = yaml.safe_dump([dict(entry)], sort_keys=False, default_flow_style=False, width=4096)
    return [" " * indent + line for line in dumped.splitlines(keepends=True)]


def _revoke_block_entry(lines: list[str], at: int, end: int, column: int) -> None:
    """Set `revoked: true` in the block-style entry whose `sha256:` key, on line `at`,
    starts at `column`."""
    first = next(
        (i for i in range(at, -1, -1) if _is_content(lines[i]) and _indent(lines[i]) < column),
        None,
    )
    if first is None or not lines[first][_indent(lines[first]) :].startswith("-"):
        raise ConfigEditError(f"line {at + 1}: the key's entry is not a block list item")
    dash = _indent(lines[first])
    last = at
    for i in range(first + 1, end):
        if _is_content(lines[i]) and _indent(lines[i]) <= dash:
            break
        last = i
    for i in range(first, last + 1):
        match = _REVOKED_LINE.match(lines[i])
        if match and len(match["lead"]) == column:
            lines[i] = (
                lines[i][: match.start()]
                + match["lead"]
                + "revoked: true"
                + lines[i][match.end() :]
            )
            return
    lines.insert(at + 1, " " * column + "revoked: true\n")


def _revoke_flow_entry(line: str) -> str:
    """`- {name: a, sha256: …}` with `revoked: true` in the braces."""
    if _FLOW_REVOKED.search(line):
        return _FLOW_REVOKED.sub(r"\g<key>true", line, count=1)
    close = line.rfind("}")
    if close < 0:
        raise ConfigEditError("an entry in braces spans more than one line")
    return line[:close].rstrip() + ", revoked: true" + line[close:]
