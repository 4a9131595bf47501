"""Parity gate: what serving computes (ONNX) must be what was evaluated (sklearn)."""

from __future__ import annotations

import numpy as np

from checks.result import CheckRow, GateResult, GateStatus, fmt_number
from models.config import ParityGateConfig

NAME = "parity"


def check_parity(
    sklearn_scores: np.ndarray, onnx_scores: np.ndarray, cfg: ParityGateConfig
) -> GateResult:
    a = np.asarray(sklearn_scores, dtype=np.float64)
    b = np.asarray(onnx_scores, dtype=np.float64)
    bound = f"<= {fmt_number(cfg.tolerance)}"
    if a.shape != b.shape or a.size == 0:
        reason = f"cannot compare: sklearn gave {a.shape[0]} scores, ONNX {b.shape[0]}"
        row = CheckRow("max |onnx - sklearn|", GateStatus.FAIL, "n/a", bound, reason)
        return GateResult(NAME, GateStatus.FAIL, reason, {"rows": float(a.size)}, {}, (row,))
    invalid = int((~np.isfinite(b)).sum() + ((b < 0) | (b > 1)).sum())
    diff = np.abs(a - b)
    max_diff = float(np.nanmax(diff)) if np.isfinite(diff).any() else float("inf")
    worst = int(np.nanargmax(diff)) if np.isfinite(diff).any() else 0
    over = int((~(diff <= cfg.tolerance)).sum())
    ok = invalid == 0 and over == 0
    rows = (
        CheckRow(
            "max |onnx - sklearn| probability",
            GateStatus.PASS if over == 0 else GateStatus.FAIL,
            fmt_number(max_diff),
            bound,
            f"{over} of {a.size} rows over the tolerance" if over else "",
        ),
        CheckRow(
            "ONNX outputs finite and in [0, 1]",
            GateStatus.PASS if invalid == 0 else GateStatus.FAIL,
            f"{invalid} invalid",
            "0 invalid",
        ),
    )
    if ok:
        reason = f"ONNX matches sklearn on {a.size} holdout rows (max diff {max_diff:.2e})"
    else:
        reason = (
            f"ONNX disagrees with sklearn: max diff {max_diff:.2e} > {cfg.tolerance:.0e} on "
            f"{over} of {a.size} rows (worst row {worst}: sklearn {a[worst]:.6f}, "
            f"onnx {b[worst]:.6f}); {invalid} invalid outputs"
        )
    return GateResult(
        NAME,
        GateStatus.PASS if ok else GateStatus.FAIL,
        reason,
        {"max_abs_diff": max_diff, "rows_over_tolerance": float(over), "rows": float(a.size)},
        {"worst_row": worst},
        rows,
    )
