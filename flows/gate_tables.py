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


# A gate's evidence may list the rows that broke an expectation (the behaviour gate's
# `failing_rows`): these columns, in this order, are what a reader needs of each.
_FAILING_ROW_COLUMNS = (
    "check",
    "row",
    "column",
    "from",
    "to",
    "score",
    "perturbed_score",
    "change",
)


def _failing_rows(result: GateResult) -> list[dict[str, object]]:
    rows = result.evidence.get("failing_rows")
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _failing_rows_title(result: GateResult) -> str:
    counts = {c.get("check"): c.get("failing_rows", 0) for c in result.evidence.get("checks", [])}
    total = sum(n for n in counts.values() if isinstance(n, int))
    shown = len(_failing_rows(result))
    cap = result.evidence.get("failing_rows_cap")
    return (
        f"{result.name}: rows that broke an expectation "
        f"({shown} shown of {total}; first {cap} per check)"
    )


def failing_rows_table(result: GateResult) -> Table:
    table = Table(title=_failing_rows_title(result), title_justify="left", expand=False)
    for col in _FAILING_ROW_COLUMNS:
        table.add_column(col, overflow="fold", max_width=40 if col == "check" else 20)
    for r in _failing_rows(result):
        table.add_row(*(_cell(r.get(col)) for col in _FAILING_ROW_COLUMNS))
    return table


def _cell(v: object) -> str:
    return "" if v is None else str(v)


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
        if _failing_rows(r):
            parts.append(failing_rows_table(r))
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
        if _failing_rows(r):
            lines += ["", f"### {_failing_rows_title(r)}", ""]
            lines.append("| " + " | ".join(_FAILING_ROW_COLUMNS) + " |")
            lines.append("|" + " --- |" * len(_FAILING_ROW_COLUMNS))
            for row in _failing_rows(r):
                cells = (_cell(row.get(col)).replace("|", "\\|") for col in _FAILING_ROW_COLUMNS)
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def training_report_markdown(
    *,
    model_name: str,
    run_id: str,
    tags: dict[str, str],
    metrics: dict[str, float],
    gates: list[GateResult],
) -> str:
    """The CI job summary of one training run: verdict, champion vs challenger, gates."""
    outcome = tags.get("mlgate.outcome", "unknown")
    version = tags.get("model_version")
    icon = {"accepted": "✅", "rejected": "❌"}.get(outcome, "⚠️")
    lines = [
        f"## {icon} {model_name}: challenger {outcome}",
        "",
        f"- training run: `{run_id}`",
        f"- registered version: {version or 'none'}",
        f"- data hash: `{tags.get('data_hash', '')[:16]}`, git commit: "
        f"`{tags.get('git_commit', '')[:12]}`",
    ]
    if tags.get("mlgate.stopped_at"):
        lines.append(f"- stopped at the **{tags['mlgate.stopped_at']}** gate")
    if tags.get("identical_to_version"):
        lines.append(f"- identical to champion v{tags['identical_to_version']}: nothing registered")
    champion = next((g for g in gates if g.name == "champion"), None)
    if champion is not None:
        metric = champion.evidence.get("primary_metric", "metric")
        chal = champion.metrics.get(f"challenger_{metric}")
        champ = champion.metrics.get(f"champion_{metric}")
        lines += ["", "### Champion vs challenger", "", "| | value |", "| --- | --- |"]
        lines.append(f"| challenger {metric} | {_fmt(chal)} |")
        if champ is not None:
            m, ev = champion.metrics, champion.evidence
            pct = round(ev.get("bootstrap", {}).get("confidence", 0.95) * 100)
            ci = f"[{_fmt(m.get('delta_ci_low'), '+')}, {_fmt(m.get('delta_ci_high'), '+')}]"
            lines.append(f"| champion v{ev.get('champion_version')} {metric} | {_fmt(champ)} |")
            lines.append(f"| difference [{pct}% CI] | {_fmt(m.get('delta'), '+')} {ci} |")
        else:
            lines.append("| champion | none yet: floor only |")
    if metrics:
        lines += ["", "### Holdout metrics", "", "| metric | value |", "| --- | --- |"]
        for k in ("roc_auc", "pr_auc", "log_loss", "brier", "f1"):
            if k in metrics:
                lines.append(f"| {k} | {metrics[k]:.4f} |")
    lines += ["", "### Gates", "", gates_markdown(gates)]
    return "\n".join(lines)


def _fmt(v: float | None, sign: str = "") -> str:
    return "n/a" if v is None or v != v else f"{v:{sign}.4f}"
