"""Gate results as tables a person reads: rich in the terminal, markdown for CI summaries."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from checks.result import GateResult, GateStatus

_STYLE = {GateStatus.PASS: "green", GateStatus.FAIL: "bold red", GateStatus.INCONCLUSIVE: "yellow"}


def _status_text(status: GateStatus) -> Text:
    return Text(status.value.upper(), style=_STYLE[status])


def gate_summary_table(results: list[GateResult], title: str = "Gates") -> Table:
    table = Table(title=title, show_lines=False, expand=False)
    table.add_column("gate", style="bold")
    table.add_column("status")
    table.add_column("reason", overflow="fold", max_width=90)
    for r in results:
        table.add_row(r.name, _status_text(r.status), r.reason)
    return table


def gate_detail_table(result: GateResult) -> Table:
    table = Table(title=f"gate: {result.name}", title_justify="left", expand=False)
    table.add_column("check", overflow="fold", max_width=50)
    table.add_column("status")
    table.add_column("value", overflow="fold", max_width=40)
    table.add_column("bound", overflow="fold", max_width=30)
    table.add_column("detail", overflow="fold", max_width=40)
    for c in result.checks:
        table.add_row(c.check, _status_text(c.status), c.value, c.bound, c.detail)
    return table


def gate_tables(results: list[GateResult], *, max_passed_rows: int | None = 20) -> Group:
    """The summary, then each gate's checks. A passed gate with more checks than
    `max_passed_rows` (the data gate's dozens) keeps to its summary line; a gate that did not
    pass always shows every check, because that is where the reader needs the numbers."""
    parts: list[Table] = [gate_summary_table(results)]
    for r in results:
        if not r.checks:
            continue
        if r.passed and max_passed_rows is not None and len(r.checks) > max_passed_rows:
            continue
        parts.append(gate_detail_table(r))
    return Group(*parts)


def gates_markdown(results: list[GateResult]) -> str:
    lines = ["| gate | status | reason |", "| --- | --- | --- |"]
    for r in results:
        reason = r.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.name} | {r.status.value} | {reason} |")
    for r in results:
        if not r.checks:
            continue
        lines += ["", f"### {r.name}", "", "| check | status | value | bound |"]
        lines.append("| --- | --- | --- | --- |")
        for c in r.checks:
            lines.append(f"| {c.check} | {c.status.value} | {c.value} | {c.bound} |")
    return "\n".join(lines) + "\n"
