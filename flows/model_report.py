"""The HTML model report of a training run: the plots a reviewer looks at before trusting a
gate verdict. Self-contained (inline SVG), so it opens from MLflow's artifact view offline."""

from __future__ import annotations

import html
import io
from typing import Any

import numpy as np
import pandas as pd

from checks.result import GateResult
from flows.gate_tables import gates_markdown
from models.metrics import metric_value


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    return buf.getvalue()[buf.getvalue().find("<svg") :]


def _curves(y: np.ndarray, models: dict[str, np.ndarray]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    roc_ax, pr_ax, cal_ax = axes
    for label, p in models.items():
        fpr, tpr, _ = roc_curve(y, p)
        roc_ax.plot(fpr, tpr, label=f"{label} (AUC {metric_value('roc_auc', y, p):.3f})")
        prec, rec, _ = precision_recall_curve(y, p)
        pr_ax.plot(rec, prec, label=f"{label} (AP {metric_value('pr_auc', y, p):.3f})")
        frac, mean_pred = calibration_curve(y, p, n_bins=10, strategy="quantile")
        cal_ax.plot(mean_pred, frac, marker="o", label=label)
    roc_ax.plot([0, 1], [0, 1], ls=":", c="grey")
    cal_ax.plot([0, 1], [0, 1], ls=":", c="grey", label="perfect")
    for ax, title, xl, yl in (
        (roc_ax, "ROC", "false positive rate", "true positive rate"),
        (pr_ax, "Precision-recall", "recall", "precision"),
        (cal_ax, "Calibration (quantile bins)", "mean predicted", "observed positive share"),
    ):
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.legend(loc="best", fontsize=8)
    svg = _svg(fig)
    plt.close(fig)
    return svg


def _slice_bars(
    y: np.ndarray, models: dict[str, np.ndarray], slices: pd.DataFrame, metric: str
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels: list[str] = []
    values: dict[str, list[float]] = {name: [] for name in models}
    for col in slices.columns:
        col_values = slices[col].astype(str).to_numpy()
        for v in sorted(set(col_values)):
            mask = col_values == v
            labels.append(f"{col}={v}\n(n={int(mask.sum())})")
            for name, p in models.items():
                values[name].append(metric_value(metric, y[mask], p[mask]))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    width = 0.8 / max(1, len(models))
    x = np.arange(len(labels))
    for i, (name, vals) in enumerate(values.items()):
        ax.bar(x + i * width, np.nan_to_num(vals), width, label=name)
    ax.set_xticks(x + width * (len(models) - 1) / 2, labels, fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per slice")
    ax.legend(fontsize=8)
    svg = _svg(fig)
    plt.close(fig)
    return svg


def _drift_bars(psi: dict[str, float], top: int = 15) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(((k, v) for k, v in psi.items() if np.isfinite(v)), key=lambda kv: -kv[1])
    items = items[:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(items) + 1))
    ax.barh([k for k, _ in items], [v for _, v in items])
    for bound, style in ((0.1, ":"), (0.25, "--")):
        ax.axvline(bound, ls=style, c="red")
    ax.set_xlabel("PSI vs the champion's reference")
    ax.set_title("Top drifted features")
    svg = _svg(fig)
    plt.close(fig)
    return svg


def _markdown_table_to_html(md: str) -> str:
    """The gate tables as HTML: the markdown renderer is the one source of their content."""
    out, in_table = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [
                html.escape(c.strip().replace("\\|", "|")) for c in line.strip("|").split(" | ")
            ]
            if set("".join(cells)) <= {"-", " "}:
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
        else:
            if in_table:
                out.append("</table>")
                in_table = False
            if line.startswith("### "):
                out.append(f"<h3>{html.escape(line[4:])}</h3>")
    if in_table:
        out.append("</table>")
    return "\n".join(out)


def report_sections(
    *,
    y: np.ndarray,
    challenger: np.ndarray,
    champion: np.ndarray | None,
    champion_version: str | None,
    slices: pd.DataFrame | None,
    gates: list[GateResult],
    primary_metric: str,
    drift_psi: dict[str, float] | None = None,
    facts: dict[str, str] | None = None,
) -> str:
    """The report's body under its title: the costly part (the plots), so the training flow
    renders it before the run it is stored in, and with it the title, exists."""
    models = {"challenger": challenger}
    if champion is not None:
        models[f"champion v{champion_version}"] = champion
    sections = [
        "<ul>"
        + "".join(
            f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>"
            for k, v in (facts or {}).items()
        )
        + "</ul>",
        "<h2>Gates</h2>",
        _markdown_table_to_html(gates_markdown(gates)),
        "<h2>Holdout curves</h2>",
        _curves(y, models),
    ]
    if slices is not None and len(slices.columns):
        sections += ["<h2>Slices</h2>", _slice_bars(y, models, slices, primary_metric)]
    if drift_psi:
        sections += ["<h2>Drift</h2>", _drift_bars(drift_psi)]
    return "".join(sections)


def titled_report(title: str, sections: str) -> str:
    """One self-contained HTML page: `title`, then `sections` (from `report_sections`)."""
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}"
        "th{background:#eee}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{sections}"
        "</body></html>"
    )


def render_model_report(*, title: str, **sections: Any) -> str:
    """The whole page at once: `titled_report(title, report_sections(**sections))`."""
    return titled_report(title, report_sections(**sections))
