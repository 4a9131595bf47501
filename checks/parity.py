"""Parity gate: what serving computes (ONNX) must be what was evaluated (sklearn).

A tree ensemble has two graphs that may serve (the CPU graph and the GPU graph of
`models.tree_graph`); the gate fails if either disagrees. The GPU graph is held to
`GPU_GRAPH_TOLERANCE` (or the configured tolerance, if tighter).
"""

from __future__ import annotations

import numpy as np

from checks.result import CheckRow, GateResult, GateStatus, fmt_number
from models.config import ParityGateConfig

NAME = "parity"
GPU_GRAPH_TOLERANCE = 1e-5


def check_parity(
    sklearn_scores: np.ndarray,
    onnx_scores: np.ndarray,
    cfg: ParityGateConfig,
    gpu_scores: np.ndarray | None = None,
) -> GateResult:
    """The CPU graph's scores against sklearn's; with `gpu_scores`, the GPU graph's too, and
    the verdict is the worse of the two."""
    cpu = _check_graph(sklearn_scores, onnx_scores, cfg.tolerance, "ONNX")
    if gpu_scores is None:
        return cpu
    tolerance = min(cfg.tolerance, GPU_GRAPH_TOLERANCE)
    gpu = _check_graph(sklearn_scores, gpu_scores, tolerance, "GPU graph")
    ok = cpu.passed and gpu.passed
    metrics = {
        **cpu.metrics,
        **{f"gpu_graph.{k}": v for k, v in gpu.metrics.items() if k != "rows"},
    }
    evidence = {**cpu.evidence, **{f"gpu_graph.{k}": v for k, v in gpu.evidence.items()}}
    if ok:
        reason = f"{cpu.reason}; {gpu.reason} (tolerance {tolerance:.0e})"
    else:
        reason = "; ".join(g.reason for g in (cpu, gpu) if not g.passed)
    return GateResult(
        NAME,
        GateStatus.PASS if ok else GateStatus.FAIL,
        reason,
        metrics,
        evidence,
        cpu.checks + gpu.checks,
    )


def _check_graph(
    sklearn_scores: np.ndarray, onnx_scores: np.ndarray, tolerance: float, graph: str
) -> GateResult:
    a = np.asarray(sklearn_scores, dtype=np.float64)
    b = np.asarray(onnx_scores, dtype=np.float64)
    bound = f"<= {fmt_number(tolerance)}"
    if a.shape != b.shape or a.size == 0:
        reason = f"cannot compare: sklearn gave {a.shape[0]} scores, {graph} {b.shape[0]}"
        row = CheckRow(f"max |{graph} - sklearn|", GateStatus.FAIL, "n/a", bound, reason)
        return GateResult(NAME, GateStatus.FAIL, reason, {"rows": float(a.size)}, {}, (row,))
    invalid = int((~np.isfinite(b)).sum() + ((b < 0) | (b > 1)).sum())
    diff = np.abs(a - b)
    max_diff = float(np.nanmax(diff)) if np.isfinite(diff).any() else float("inf")
    worst = int(np.nanargmax(diff)) if np.isfinite(diff).any() else 0
    over = int((~(diff <= tolerance)).sum())
    ok = invalid == 0 and over == 0
    rows = (
        CheckRow(
            f"max |{graph} - sklearn| probability",
            GateStatus.PASS if over == 0 else GateStatus.FAIL,
            fmt_number(max_diff),
            bound,
            f"{over} of {a.size} rows over the tolerance" if over else "",
        ),
        CheckRow(
            f"{graph} outputs finite and in [0, 1]",
            GateStatus.PASS if invalid == 0 else GateStatus.FAIL,
            f"{invalid} invalid",
            "0 invalid",
        ),
    )
    if ok:
        reason = f"{graph} matches sklearn on {a.size} holdout rows (max diff {max_diff:.2e})"
    else:
        reason = (
            f"{graph} disagrees with sklearn: max diff {max_diff:.2e} > {tolerance:.0e} on "
            f"{over} of {a.size} rows (worst row {worst}: sklearn {a[worst]:.6f}, "
            f"{graph} {b[worst]:.6f}); {invalid} invalid outputs"
        )
    return GateResult(
        NAME,
        GateStatus.PASS if ok else GateStatus.FAIL,
        reason,
        {"max_abs_diff": max_diff, "rows_over_tolerance": float(over), "rows": float(a.size)},
        {"worst_row": worst},
        rows,
    )
