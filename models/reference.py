"""Reference histograms: the training data's distribution, kept with the model version so
monitoring can measure drift without the raw training data.

Numeric columns get quantile bins of the reference with open outer edges (-inf, +inf), so
new values outside the reference range land in the outer bins. A value that holds at least
one bin's worth of the reference (the 0 and the 1 of a binary column, the only value of a
constant column) gets a bin of its own, [v, next float after v), which leaves a bin below
it and a bin above it. Categorical columns get one bucket per reference category plus a
last "__unseen__" bucket with share 0 in the reference.

Nulls are their own bucket, after the bins: a feature that starts arriving empty is drift
the monitoring must see, and it is the inference log (not the data gate) that monitoring
reads. `shares` are over the non-null values; `null_share` is over all rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Literal

import numpy as np
import pandas as pd

from models.config import DatasetConfig

SCORE_COLUMN = "__score__"
UNSEEN = "__unseen__"
FORMAT_VERSION = 1

Kind = Literal["numeric", "categorical"]


@dataclass(frozen=True)
class FeatureHistogram:
    column: str
    kind: Kind
    edges: list[float] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    count: int = 0
    null_share: float = 0.0

    @property
    def n_bins(self) -> int:
        return len(self.shares)

    def bucket_shares(self) -> np.ndarray:
        """Reference shares of every bucket bin_counts returns: the bins, then nulls."""
        bins = np.asarray(self.shares, dtype=np.float64) * (1.0 - self.null_share)
        return np.append(bins, self.null_share)

    def bucket_labels(self) -> list[str]:
        if self.kind == "categorical":
            return [*self.categories, "null"]
        labels = []
        for i, (lo, hi) in enumerate(pairwise(self.edges)):
            if hi == math.nextafter(lo, math.inf):
                labels.append(f"= {lo:g}")
            elif i > 0 and lo == math.nextafter(self.edges[i - 1], math.inf):
                labels.append(f"({self.edges[i - 1]:g}, {hi:g})")
            else:
                labels.append(f"[{lo:g}, {hi:g})")
        return [*labels, "null"]

    def to_dict(self) -> dict[str, Any]:
        # Strict JSON has no infinities; the outer edges travel as strings.
        return {
            "column": self.column,
            "kind": self.kind,
            "edges": [e if math.isfinite(e) else str(e) for e in self.edges],
            "categories": list(self.categories),
            "shares": list(self.shares),
            "count": self.count,
            "null_share": self.null_share,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureHistogram:
        kind = d["kind"]
        if kind not in ("numeric", "categorical"):
            raise ValueError(f"histogram {d.get('column')!r}: unknown kind {kind!r}")
        return cls(
            column=str(d["column"]),
            kind=kind,
            edges=[float(e) for e in d.get("edges", [])],
            categories=[str(c) for c in d.get("categories", [])],
            shares=[float(s) for s in d["shares"]],
            count=int(d["count"]),
            null_share=float(d["null_share"]),
        )


@dataclass(frozen=True)
class ReferenceHistograms:
    """Histograms by column; the prediction score, when present, is under SCORE_COLUMN."""

    histograms: dict[str, FeatureHistogram]
    bins: int = 10

    @property
    def score(self) -> FeatureHistogram | None:
        return self.histograms.get(SCORE_COLUMN)

    @property
    def features(self) -> dict[str, FeatureHistogram]:
        return {k: h for k, h in self.histograms.items() if k != SCORE_COLUMN}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "bins": self.bins,
            "histograms": [h.to_dict() for h in self.histograms.values()],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReferenceHistograms:
        if d.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"reference histograms in format {d.get('format')!r}, expected {FORMAT_VERSION}"
            )
        hists = [FeatureHistogram.from_dict(h) for h in d["histograms"]]
        return cls({h.column: h for h in hists}, int(d["bins"]))


def _as_float(values: Any) -> np.ndarray:
    s = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values))
    if s.dtype == object:
        # Numbers next to None come back from JSON and Parquet as objects; strings still raise.
        s = pd.to_numeric(s, errors="raise")
    if not (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s)):
        raise TypeError(f"expected numbers, got dtype {s.dtype}")
    return s.to_numpy(dtype=np.float64, na_value=np.nan)


def _inner_edges(finite: np.ndarray, bins: int) -> list[float]:
    if finite.size == 0:
        return []
    quantiles = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    inner: list[float] = []
    for q in quantiles.tolist():
        inner.append(q)
        # A point mass of at least one bin would otherwise share a bin with whatever lies
        # above it (2s with the 1s of a binary column); isolating it keeps "below", "at"
        # and "above" apart.
        if np.count_nonzero(finite == q) * bins >= finite.size:
            inner.append(math.nextafter(q, math.inf))
    return inner


def _numeric_histogram(column: str, values: Any, bins: int) -> FeatureHistogram:
    x = _as_float(values)
    nulls = int(np.isnan(x).sum())
    inner = _inner_edges(x[np.isfinite(x)], bins)
    edges = [-math.inf, *inner, math.inf]
    hist = FeatureHistogram(column, "numeric", edges=edges, shares=[0.0] * (len(edges) - 1))
    counts = bin_counts(hist, x)[:-1]
    nonnull = x.size - nulls
    shares = (counts / nonnull).tolist() if nonnull else [0.0] * len(counts)
    return FeatureHistogram(
        column,
        "numeric",
        edges=edges,
        shares=shares,
        count=int(x.size),
        null_share=nulls / x.size,
    )


def _categorical_histogram(column: str, values: Any) -> FeatureHistogram:
    s = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values))
    nulls = int(s.isna().sum())
    by_key = _counts_by_key(s)
    categories = sorted(by_key)
    nonnull = len(s) - nulls
    shares = [by_key[c] / nonnull for c in categories] if nonnull else [0.0] * len(categories)
    return FeatureHistogram(
        column,
        "categorical",
        categories=[*categories, UNSEEN],
        shares=[*shares, 0.0],
        count=len(s),
        null_share=nulls / len(s),
    )


def _counts_by_key(s: pd.Series) -> dict[str, int]:
    """Counts by the string form of each value: the reference's categories are strings after
    a JSON round trip, so current values are matched by the same form. Counting first and
    converting the few distinct values is far cheaper than converting a million rows."""
    counts: dict[str, int] = {}
    vc = s.value_counts(dropna=True, sort=False)
    for value, n in zip(vc.index.tolist(), vc.to_numpy().tolist(), strict=True):
        if n:
            key = str(value)
            counts[key] = counts.get(key, 0) + int(n)
    return counts


def compute_feature_histogram(
    column: str, values: Any, kind: Kind, bins: int = 10
) -> FeatureHistogram:
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    if len(values) == 0:
        raise ValueError(f"column {column!r}: no reference rows to build a histogram from")
    if kind == "numeric":
        return _numeric_histogram(column, values, bins)
    if kind == "categorical":
        return _categorical_histogram(column, values)
    raise ValueError(f"column {column!r}: unknown kind {kind!r}")


def compute_reference_histograms(
    df: pd.DataFrame, dataset: DatasetConfig, scores: np.ndarray | None, bins: int = 10
) -> ReferenceHistograms:
    missing = [c for c in dataset.features if c not in df.columns]
    if missing:
        raise ValueError(f"reference data lacks configured column(s) {', '.join(missing)}")
    hists: dict[str, FeatureHistogram] = {}
    for col in dataset.numeric_features:
        hists[col] = compute_feature_histogram(col, df[col], "numeric", bins)
    for col in dataset.categorical_features:
        hists[col] = compute_feature_histogram(col, df[col], "categorical", bins)
    if scores is not None:
        scores = np.asarray(scores)
        if scores.shape != (len(df),):
            raise ValueError(f"{scores.shape[0]} scores for {len(df)} reference rows")
        hists[SCORE_COLUMN] = compute_feature_histogram(SCORE_COLUMN, scores, "numeric", bins)
    return ReferenceHistograms(hists, bins)


def bin_counts(hist: FeatureHistogram, values: Any) -> np.ndarray:
    """Counts of `values` in the reference buckets: one per bin (numeric bins are
    [lower, upper)), then one for nulls (NaN, None, NA). Length `hist.n_bins + 1`."""
    if hist.kind == "numeric":
        x = _as_float(values)
        null = np.isnan(x)
        nulls = int(null.sum())
        present = x[~null] if nulls else x
        inner = np.asarray(hist.edges[1:-1], dtype=np.float64)
        idx = np.searchsorted(inner, present, side="right")
        counts = np.bincount(idx, minlength=hist.n_bins).astype(np.int64)
        return np.append(counts, nulls)
    s = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values))
    position = {c: i for i, c in enumerate(hist.categories)}
    unseen = position[UNSEEN]
    counts = np.zeros(hist.n_bins + 1, dtype=np.int64)
    for key, n in _counts_by_key(s).items():
        counts[position.get(key, unseen)] += n
    counts[-1] = int(s.isna().sum())
    return counts
