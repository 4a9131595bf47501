"""The data gate: a Great Expectations 1.x suite built from the dataset config and a profile
of the reference data, run once over a batch and read back as a `GateResult`.

This is the only module that knows GX's API and its result layout.

Column presence and column types are checked here in pandas before GX runs: GX raises deep
inside its metric code on a missing column or on strings in a numeric column, and reports
such errors as an opaque traceback, so those columns get a readable failed check and their
value-level expectations are left out of the suite.

On request the same validation result is also rendered as GX's own HTML Data Docs, for the
training flow to log next to the evidence. Those pages show only what GX validated: the
checks decided here in pandas (column presence, types, reference coverage) are in the
`GateResult` alone.
"""

from __future__ import annotations

import difflib
import logging
import math
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import pandas as pd

from checks.result import CheckRow, GateResult, GateStatus, fmt_number
from models.config import DataGateConfig, DatasetConfig

GATE_NAME = "data"

# A range learned from one reference sample is not a law of nature: a handful of legitimate
# new extremes (a long-tenured customer, a new price tier) must not stop training, while a
# unit change or a shifted column moves far more than 1% of the rows out of range.
RANGE_MOSTLY = 0.99

_EXAMPLES = 3
# GX returns the first N unexpected values with repeats; asking for more than we show leaves
# enough to find a few distinct ones.
_PARTIAL_UNEXPECTED = 20

ColumnRole = Literal["numeric", "categorical", "label", "id", "timestamp"]

# Results are matched back to checks through this meta key because GX returns results in its
# own order, not the suite's.
_META_KEY = "mlgate_check"

_DOCS_SITE = "mlgate"
# GX's docs section for profiling picks up runs whose name contains "profiling"; this one
# must land in the validations section.
_DOCS_RUN_NAME = "mlgate-data-gate"


@dataclass(frozen=True)
class DataProfile:
    """Statistics learned from the reference data; JSON-serialisable through `to_dict`."""

    columns: dict[str, str]
    numeric_ranges: dict[str, tuple[float, float]]
    null_shares: dict[str, float]
    categories: dict[str, list[str]]
    label_values: list[str]
    row_count: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": dict(self.columns),
            "numeric_ranges": {k: [lo, hi] for k, (lo, hi) in self.numeric_ranges.items()},
            "null_shares": dict(self.null_shares),
            "categories": {k: list(v) for k, v in self.categories.items()},
            "label_values": list(self.label_values),
            "row_count": self.row_count,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataProfile:
        return cls(
            columns={str(k): str(v) for k, v in d["columns"].items()},
            numeric_ranges={
                str(k): (float(v[0]), float(v[1])) for k, v in d["numeric_ranges"].items()
            },
            null_shares={str(k): float(v) for k, v in d["null_shares"].items()},
            categories={str(k): [str(x) for x in v] for k, v in d["categories"].items()},
            label_values=[str(x) for x in d["label_values"]],
            row_count=int(d["row_count"]),
        )


def profile_reference(df: pd.DataFrame, dataset: DatasetConfig) -> DataProfile:
    """Learn the data gate's bounds from reference (training) data.

    Never raises for a data problem: a configured column the reference lacks, or a numeric
    feature it does not hold as numbers, is left out of the profile, and the gate then
    fails every batch on that column with a reason that says so. The training flow
    profiles the very batch it is about to gate, so raising here would hide the gate's
    explanation behind a crash.
    """
    n = len(df)
    columns: dict[str, str] = {}
    for col, role in _column_roles(dataset, with_label=True).items():
        if col not in df.columns:
            continue
        if role == "numeric" and not _is_numeric(df[col]):
            continue
        columns[col] = role

    numeric_ranges: dict[str, tuple[float, float]] = {}
    categories: dict[str, list[str]] = {}
    label_values: list[str] = []
    for col, kind in columns.items():
        if kind == "numeric":
            values = _as_float(df[col])
            # Infinities would make the range unbounded (and the profile invalid JSON); an
            # all-null reference column has no range to learn, its null share still guards it.
            values = values[values.abs() < math.inf]
            if len(values):
                numeric_ranges[col] = (float(values.min()), float(values.max()))
        elif kind == "categorical":
            categories[col] = sorted(set(_as_text(df[col]).dropna().tolist()))
        elif kind == "label":
            label_values = sorted(set(_as_text(df[col]).dropna().tolist()))
    return DataProfile(
        columns=columns,
        numeric_ranges=numeric_ranges,
        null_shares={c: float(df[c].isna().mean()) if n else 0.0 for c in columns},
        categories=categories,
        label_values=label_values,
        row_count=n,
    )


def check_data_quality(
    df: pd.DataFrame,
    dataset: DatasetConfig,
    gate: DataGateConfig,
    reference: DataProfile,
    *,
    with_label: bool = True,
    now: datetime | None = None,
    docs_dir: Path | None = None,
) -> GateResult:
    """Validate a batch against the suite generated from the config and the reference profile.

    With `docs_dir`, GX also renders that one validation result as HTML Data Docs under
    `docs_dir` (index, validation page, suite page, static assets) and the evidence gets
    `data_docs_index` and `data_docs_validation_page`, paths relative to `docs_dir`, or
    `data_docs_error` when rendering failed. Docs never change the verdict. Give it a fresh
    directory: GX deletes the validation and suite pages it finds there from earlier runs.

    `with_label=False` gates live inference traffic: the features only, without the label,
    the id or the timestamp column of a training table.

    Never raises: an error inside the gate is a `fail` whose reason carries the error.
    """
    started = time.perf_counter()
    try:
        return _check_data_quality(df, dataset, gate, reference, with_label, now, started, docs_dir)
    except Exception as err:
        evidence: dict[str, Any] = {
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }
        if docs_dir is not None:
            evidence["data_docs_error"] = "not rendered: the data gate itself failed"
        return GateResult(
            name=GATE_NAME,
            status=GateStatus.FAIL,
            reason=f"data gate error (failing closed): {type(err).__name__}: {err}",
            metrics={
                "checks_total": 0.0,
                "checks_failed": 0.0,
                "rows": float(len(df)) if isinstance(df, pd.DataFrame) else math.nan,
                "seconds": time.perf_counter() - started,
            },
            evidence=evidence,
        )


@dataclass
class _Outcome:
    success: bool
    value: str
    failure: str = ""
    observed: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Check:
    """One row of the gate: decided in pandas (`outcome` set up front) or by GX (`expectation`
    set, `describe` turns GX's result dict into an outcome)."""

    check: str
    column: str | None
    bound: str
    kind: str
    outcome: _Outcome | None = None
    expectation: Any = None
    describe: Callable[[dict[str, Any]], _Outcome] | None = None
    gx_result: dict[str, Any] | None = None


def _check_data_quality(
    df: pd.DataFrame,
    dataset: DatasetConfig,
    gate: DataGateConfig,
    reference: DataProfile,
    with_label: bool,
    now: datetime | None,
    started: float,
    docs_dir: Path | None,
) -> GateResult:
    import great_expectations as gx

    now_utc = _to_utc(now or datetime.now(UTC))
    roles = _column_roles(dataset, with_label=with_label)
    checks, frame = _plan_checks(df, gate, reference, roles, now_utc)
    gx_checks = [c for c in checks if c.expectation is not None]
    for i, c in enumerate(gx_checks):
        c.expectation.meta = {_META_KEY: i}

    context = gx.get_context(mode="ephemeral", project_config=_quiet_context_config())
    asset = context.data_sources.add_pandas("mlgate").add_dataframe_asset("batch")
    batch = asset.add_batch_definition_whole_dataframe("whole").get_batch(
        batch_parameters={"dataframe": frame}
    )
    # Built in one go rather than with add_expectation: that method silently drops an
    # expectation equal to one already present, ignoring meta.
    suite = gx.ExpectationSuite(name=GATE_NAME, expectations=[c.expectation for c in gx_checks])
    if len(suite.expectations) != len(gx_checks):
        raise RuntimeError(
            f"GX accepted {len(suite.expectations)} of {len(gx_checks)} expectations"
        )
    validated = batch.validate(
        suite,
        result_format={"result_format": "BASIC", "partial_unexpected_count": _PARTIAL_UNEXPECTED},
    )

    by_index: dict[int, dict[str, Any]] = {}
    for r in validated.results:
        # to_json_dict turns numpy scalars and timestamps into plain JSON values.
        as_json: dict[str, Any] = r.to_json_dict()
        by_index[int(as_json["expectation_config"]["meta"][_META_KEY])] = as_json
    for i, c in enumerate(gx_checks):
        c.gx_result = by_index.get(i)
        if c.gx_result is None:
            c.outcome = _Outcome(False, "no result", f"{c.check}: GX returned no result")
        else:
            c.outcome = _read_gx_result(c, c.gx_result)

    docs: dict[str, Any] = {}
    if docs_dir is not None:
        docs = _write_data_docs(context, suite, validated, batch.id, Path(docs_dir))
    return _assemble(checks, df, with_label, now_utc, gx.__version__, started, docs)


def _plan_checks(
    df: pd.DataFrame,
    gate: DataGateConfig,
    reference: DataProfile,
    roles: dict[str, ColumnRole],
    now: datetime,
) -> tuple[list[_Check], pd.DataFrame]:
    """The checks in table order, and the frame GX validates (only the columns it needs,
    categories as text so they compare with the profile's string sets)."""
    from great_expectations import expectations as gxe

    checks: list[_Check] = []
    frame: dict[str, pd.Series] = {}
    n = len(df)

    rows_bound = _rows_bound(gate.min_rows, gate.max_rows)
    checks.append(
        _Check(
            check=f"row count {rows_bound}",
            column=None,
            bound=rows_bound,
            kind="rows",
            expectation=gxe.ExpectTableRowCountToBeBetween(
                min_value=gate.min_rows, max_value=gate.max_rows
            ),
            describe=_describe_rows(gate.min_rows, gate.max_rows),
        )
    )

    extra_columns = [str(c) for c in df.columns if c not in roles]
    for col, role in roles.items():
        present = col in df.columns
        checks.append(_presence_check(col, present, extra_columns))
        if not present:
            continue
        known_as = reference.columns.get(col)
        if known_as != role:
            checks.append(_reference_check(col, role, known_as))
            continue
        s = df[col]

        if role == "numeric":
            type_check = _numeric_type_check(col, s)
            checks.append(type_check)
            typed = type_check.outcome is not None and type_check.outcome.success
            frame[col] = _as_float(s) if typed else s
        elif role == "timestamp":
            ts, type_check = _timestamp_type_check(col, s)
            checks.append(type_check)
            typed = ts is not None
            frame[col] = ts if ts is not None else s
        elif role in ("categorical", "label"):
            typed = True
            frame[col] = _as_text(s)
        else:
            typed = True
            frame[col] = s

        if role != "label":
            allowed = min(
                1.0,
                max(gate.max_null_share, reference.null_shares[col] + gate.null_share_tolerance),
            )
            checks.append(
                _Check(
                    check=f"{col} nulls ≤ {_pct(allowed)}",
                    column=col,
                    bound=f"≤ {_pct(allowed)}",
                    kind="nulls",
                    expectation=gxe.ExpectColumnValuesToNotBeNull(
                        column=col, mostly=_mostly(1.0 - allowed)
                    ),
                    describe=_describe_nulls(col, allowed, n),
                )
            )

        if role == "numeric" and typed and col in reference.numeric_ranges:
            lo, hi = reference.numeric_ranges[col]
            pad = gate.range_tolerance * (hi - lo)
            lo, hi = lo - pad, hi + pad
            span = f"[{fmt_number(lo, 6)}, {fmt_number(hi, 6)}]"
            checks.append(
                _Check(
                    check=f"{col} within {span}",
                    column=col,
                    bound=f"≥ {_pct(RANGE_MOSTLY)} of values within {span}",
                    kind="range",
                    expectation=gxe.ExpectColumnValuesToBeBetween(
                        column=col, min_value=lo, max_value=hi, mostly=RANGE_MOSTLY
                    ),
                    describe=_describe_range(col, span, RANGE_MOSTLY),
                )
            )
        elif role == "categorical":
            known = reference.categories[col]
            mostly = gate.min_category_share_known
            checks.append(
                _Check(
                    check=f"{col} in {len(known)} known values",
                    column=col,
                    bound=f"≥ {_pct(mostly)} known ({_examples(known, 6)})",
                    kind="categories",
                    expectation=gxe.ExpectColumnValuesToBeInSet(
                        column=col, value_set=known, mostly=_mostly(mostly)
                    ),
                    describe=_describe_categories(col, mostly),
                )
            )
        elif role == "label":
            checks.append(
                _Check(
                    check=f"{col} (label) has no nulls",
                    column=col,
                    bound="0 nulls",
                    kind="label_nulls",
                    expectation=gxe.ExpectColumnValuesToNotBeNull(column=col),
                    describe=_describe_label_nulls(col),
                )
            )
            labels = reference.label_values
            checks.append(
                _Check(
                    check=f"{col} (label) values in {{{_examples(labels, 10)}}}",
                    column=col,
                    bound=f"subset of {{{_examples(labels, 10)}}}",
                    kind="label_values",
                    expectation=gxe.ExpectColumnValuesToBeInSet(column=col, value_set=labels),
                    describe=_describe_label_values(col, labels),
                )
            )
        elif role == "id":
            checks.append(
                _Check(
                    check=f"{col} (id) unique",
                    column=col,
                    bound="no duplicates",
                    kind="unique",
                    expectation=gxe.ExpectColumnValuesToBeUnique(column=col),
                    describe=_describe_unique(col),
                )
            )
        elif role == "timestamp" and typed and gate.max_staleness_days is not None:
            cutoff = now - timedelta(days=gate.max_staleness_days)
            days = fmt_number(gate.max_staleness_days)
            checks.append(
                _Check(
                    check=f"newest {col} at most {days} days old",
                    column=col,
                    bound=f"≥ {cutoff.isoformat(timespec='seconds')}",
                    kind="fresh",
                    expectation=gxe.ExpectColumnMaxToBeBetween(column=col, min_value=cutoff),
                    describe=_describe_fresh(col, now, gate.max_staleness_days),
                )
            )

    return checks, pd.DataFrame(frame, index=df.index)


def _assemble(
    checks: list[_Check],
    df: pd.DataFrame,
    with_label: bool,
    now: datetime,
    gx_version: str,
    started: float,
    docs: dict[str, Any],
) -> GateResult:
    rows: list[CheckRow] = []
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    for c in checks:
        outcome = c.outcome
        if outcome is None:
            raise RuntimeError(f"check {c.check!r} has no outcome")
        status = GateStatus.PASS if outcome.success else GateStatus.FAIL
        detail = "" if outcome.success else outcome.failure
        rows.append(CheckRow(c.check, status, outcome.value, c.bound, detail))
        if not outcome.success:
            failures.append(outcome.failure or c.check)
        raw = c.gx_result
        if raw is not None:
            kwargs = {
                k: v for k, v in raw["expectation_config"]["kwargs"].items() if k != "batch_id"
            }
            results.append(
                {
                    "check": c.check,
                    "column": c.column,
                    "source": "great_expectations",
                    "expectation_type": raw["expectation_config"]["type"],
                    "kwargs": kwargs,
                    "success": bool(raw["success"]),
                    "observed": raw.get("result", {}),
                    "exception": _exception_message(raw.get("exception_info")),
                }
            )
        else:
            results.append(
                {
                    "check": c.check,
                    "column": c.column,
                    "source": "mlgate",
                    "expectation_type": f"expect_{c.kind}",
                    "kwargs": {"column": c.column},
                    "success": outcome.success,
                    "observed": outcome.observed,
                }
            )

    total, failed = len(rows), len(failures)
    if failed:
        reason = f"{failed} of {total} checks failed: " + "; ".join(failures)
    else:
        reason = f"all {total} checks passed on {fmt_number(len(df))} rows"
    seconds = time.perf_counter() - started
    return GateResult(
        name=GATE_NAME,
        status=GateStatus.FAIL if failed else GateStatus.PASS,
        reason=reason,
        metrics={
            "checks_total": float(total),
            "checks_failed": float(failed),
            "rows": float(len(df)),
            "seconds": seconds,
        },
        evidence={
            "engine": "great_expectations",
            "gx_version": gx_version,
            "suite": GATE_NAME,
            "rows": len(df),
            "with_label": with_label,
            "now": now.isoformat(),
            "range_mostly": RANGE_MOSTLY,
            "results": results,
            **docs,
        },
        checks=tuple(rows),
    )


def _write_data_docs(
    context: Any, suite: Any, validated: Any, batch_id: str, docs_dir: Path
) -> dict[str, Any]:
    """Render the validation GX already ran as its HTML Data Docs; the evidence keys to add.

    Runs after the verdict is decided and catches everything: docs can neither fail nor pass
    the gate.
    """
    started = time.perf_counter()
    try:
        index, page = _build_data_docs(context, suite, validated, batch_id, docs_dir)
    except Exception as err:
        return {
            "data_docs_error": f"{type(err).__name__}: {err}",
            "data_docs_seconds": time.perf_counter() - started,
        }
    return {
        "data_docs_index": index,
        "data_docs_validation_page": page,
        "data_docs_seconds": time.perf_counter() - started,
    }


def _build_data_docs(
    context: Any, suite: Any, validated: Any, batch_id: str, docs_dir: Path
) -> tuple[str, str]:
    """GX renders pages from its stores, not from a result object: the result and the suite
    go into the context's in-memory stores, then a local site builds just those pages."""
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    base = docs_dir.absolute()
    context.add_data_docs_site(
        site_name=_DOCS_SITE,
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(base),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "show_how_to_buttons": False,
        },
    )
    run_id = RunIdentifier(run_name=_DOCS_RUN_NAME, run_time=datetime.now(UTC))
    # What a Checkpoint run records; the page header reads the run from here.
    validated.meta["run_id"] = run_id
    validated.meta["validation_time"] = run_id.run_time
    suite_id = ExpectationSuiteIdentifier(name=suite.name)
    result_id = ValidationResultIdentifier(
        expectation_suite_identifier=suite_id, run_id=run_id, batch_identifier=batch_id
    )
    context.validation_results_store.set(result_id, validated)
    context.suites.add(suite)

    with _logged_errors("great_expectations") as errors:
        context.build_data_docs(site_names=[_DOCS_SITE], resource_identifiers=[result_id, suite_id])

    # GX logs a page it failed to render and carries on, so a missing file is the error.
    index = _site_path(context, base, None)
    page = _site_path(context, base, result_id)
    if index is None or page is None:
        missing = "index page" if index is None else "validation page"
        logged = f": {errors[-1]}" if errors else ""
        raise RuntimeError(f"GX wrote no {missing} under {base}{logged}")
    return index, page


def _site_path(context: Any, base: Path, resource_id: Any) -> str | None:
    """The page's path relative to the site, if GX wrote it."""
    urls = context.get_docs_sites_urls(resource_identifier=resource_id, site_name=_DOCS_SITE)
    url = urls[0]["site_url"] if urls else None
    if not url:
        return None
    prefix = f"file://{base}/"
    if not url.startswith(prefix):
        raise RuntimeError(f"GX put a data docs page outside {base}: {url}")
    relative = unquote(url[len(prefix) :])
    # GX writes an empty index when rendering it failed.
    page = base / relative
    return relative if page.is_file() and page.stat().st_size > 0 else None


@contextmanager
def _logged_errors(logger_name: str) -> Iterator[list[str]]:
    """The errors a library logs meanwhile, first lines only (GX appends whole tracebacks)."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage().split("Detailed information follows:")[-1]
            messages.append(text.split("Traceback:")[0].strip())

    handler = _Collect(level=logging.ERROR)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _column_roles(dataset: DatasetConfig, *, with_label: bool) -> dict[str, ColumnRole]:
    # Without the label the batch is live inference traffic: requests carry the features
    # only, so the id and timestamp columns of a training table are not expected either.
    roles: dict[str, ColumnRole] = {}
    if dataset.id_column and with_label:
        roles[dataset.id_column] = "id"
    for c in dataset.numeric_features:
        roles[c] = "numeric"
    for c in dataset.categorical_features:
        roles[c] = "categorical"
    if dataset.timestamp_column and with_label:
        roles[dataset.timestamp_column] = "timestamp"
    if with_label:
        roles[dataset.target] = "label"
    return roles


def _reference_check(col: str, role: str, known_as: str | None) -> _Check:
    """A column the reference profile cannot bound (added to the config after the profile
    was learned, or absent or not numeric in the reference data) fails: checking less
    without saying so would be a silent pass."""
    seen = "not in the reference profile" if known_as is None else f"profiled as {known_as}"
    return _Check(
        check=f"{col} has reference statistics",
        column=col,
        bound=f"profiled as {role}",
        kind="reference_statistics",
        outcome=_Outcome(
            False,
            seen,
            f"{col}: {seen}, expected {role} (re-profile the reference data for this config)",
            observed={"profiled_as": known_as, "configured_as": role},
        ),
    )


def _presence_check(col: str, present: bool, extra_columns: list[str]) -> _Check:
    if present:
        outcome = _Outcome(True, "present", observed={"present": True})
    else:
        near = difflib.get_close_matches(col, extra_columns, n=3, cutoff=0.5)
        hint = f" (unexpected columns like it: {', '.join(near)})" if near else ""
        outcome = _Outcome(
            False,
            "missing",
            f"{col}: column missing{hint}",
            observed={"present": False, "similar_columns": near},
        )
    return _Check(
        check=f"column {col} present",
        column=col,
        bound="present",
        kind="column_present",
        outcome=outcome,
    )


def _numeric_type_check(col: str, s: pd.Series) -> _Check:
    dtype = str(s.dtype)
    if _is_numeric(s):
        outcome = _Outcome(True, dtype, observed={"dtype": dtype})
    else:
        present = s.dropna()
        bad = present[pd.to_numeric(present.astype(object), errors="coerce").isna()]
        examples = (bad if len(bad) else present).head(_PARTIAL_UNEXPECTED).tolist()
        eg = f" (e.g. {_examples(examples)})" if examples else ""
        outcome = _Outcome(
            False,
            f"{dtype}{eg}",
            f"{col}: expected numeric type, saw {dtype}{eg}",
            observed={
                "dtype": dtype,
                "non_numeric_count": len(bad),
                "examples": [_jsonable(v) for v in examples[:_EXAMPLES]],
            },
        )
    return _Check(
        check=f"{col} numeric type",
        column=col,
        bound="numeric dtype",
        kind="column_numeric_type",
        outcome=outcome,
    )


def _timestamp_type_check(col: str, s: pd.Series) -> tuple[pd.Series | None, _Check]:
    """Datetime columns, or text that parses as datetimes (CSV files carry them as text),
    normalised to UTC; naive timestamps are taken to be UTC."""
    dtype = str(s.dtype)
    ts: pd.Series | None = None
    examples: list[Any] = []
    if pd.api.types.is_datetime64_any_dtype(s):
        ts = s.dt.tz_localize(UTC) if s.dt.tz is None else s.dt.tz_convert(UTC)
    elif pd.api.types.is_object_dtype(s) or pd.api.types.is_string_dtype(s):
        parsed = pd.to_datetime(s, errors="coerce", utc=True, format="mixed")
        unparsed = s.notna() & parsed.isna()
        if unparsed.any():
            examples = s[unparsed].head(_PARTIAL_UNEXPECTED).tolist()
        else:
            ts = parsed
    else:
        examples = s.dropna().head(_EXAMPLES).tolist()

    if ts is not None:
        outcome = _Outcome(True, dtype, observed={"dtype": dtype})
    else:
        eg = f" (e.g. {_examples(examples)})" if examples else ""
        outcome = _Outcome(
            False,
            f"{dtype}{eg}",
            f"{col}: expected timestamps, saw {dtype}{eg}",
            observed={"dtype": dtype, "examples": [_jsonable(v) for v in examples[:_EXAMPLES]]},
        )
    check = _Check(
        check=f"{col} timestamp type",
        column=col,
        bound="datetime or parseable text",
        kind="column_timestamp_type",
        outcome=outcome,
    )
    return ts, check


def _read_gx_result(c: _Check, d: dict[str, Any]) -> _Outcome:
    error = _exception_message(d.get("exception_info"))
    if error:
        return _Outcome(False, "error", f"{c.check}: GX error: {error}")
    if c.describe is None:
        raise RuntimeError(f"check {c.check!r} has an expectation but no describer")
    outcome = c.describe(d.get("result") or {})
    # GX's verdict is the verdict; the describer only words it.
    outcome.success = bool(d["success"])
    return outcome


def _exception_message(info: Any) -> str | None:
    """GX reports `{raised_exception, exception_message, ...}` when a check ran, but a dict of
    those keyed by metric id when a metric failed to compute."""
    if not isinstance(info, dict):
        return None
    if "raised_exception" in info:
        return str(info.get("exception_message")) if info.get("raised_exception") else None
    messages = [
        str(v.get("exception_message"))
        for v in info.values()
        if isinstance(v, dict) and v.get("exception_message")
    ]
    return "; ".join(messages) or None


def _describe_rows(lo: int, hi: int | None) -> Callable[[dict[str, Any]], _Outcome]:
    def describe(r: dict[str, Any]) -> _Outcome:
        seen = r.get("observed_value")
        value = fmt_number(seen)
        if seen is not None and seen < lo:
            failure = f"rows: {value} < {fmt_number(lo)} minimum"
        elif seen is not None and hi is not None and seen > hi:
            failure = f"rows: {value} > {fmt_number(hi)} maximum"
        else:
            failure = f"rows: {value}, expected {_rows_bound(lo, hi)}"
        return _Outcome(True, value, failure, r)

    return describe


def _describe_nulls(col: str, allowed: float, n: int) -> Callable[[dict[str, Any]], _Outcome]:
    def describe(r: dict[str, Any]) -> _Outcome:
        count = int(r.get("unexpected_count") or 0)
        share = count / n if n else 0.0
        value = f"{_pct(share)} ({fmt_number(count)} of {fmt_number(n)})"
        return _Outcome(True, value, f"{col}: {_pct(share)} nulls > {_pct(allowed)} allowed", r)

    return describe


def _describe_range(col: str, span: str, mostly: float) -> Callable[[dict[str, Any]], _Outcome]:
    def describe(r: dict[str, Any]) -> _Outcome:
        value, eg = _unexpected_summary(r, "outside")
        return _Outcome(
            True,
            value,
            f"{col}: {value} {span}{eg}, more than the {_pct(1 - mostly)} allowed",
            r,
        )

    return describe


def _describe_categories(col: str, mostly: float) -> Callable[[dict[str, Any]], _Outcome]:
    def describe(r: dict[str, Any]) -> _Outcome:
        value, eg = _unexpected_summary(r, "unknown")
        return _Outcome(
            True,
            value,
            f"{col}: {value} categories{eg}, more than the {_pct(1 - mostly)} allowed",
            r,
        )

    return describe


def _describe_label_nulls(col: str) -> Callable[[dict[str, Any]], _Outcome]:
    def describe(r: dict[str, Any]) -> _Outcome:
        count = int(r.get("unexpected_count") or 0)
        return _Outcome(True, f"{fmt_number(count)} nulls", f"{col}: {count:,} null labels", r)

    return describe


def _describe_label_values(col: str, labels: list[str]) -> Callable[[dict[str, Any]], _Outcome]:
    def describe(r: dict[str, Any]) -> _Outcome:
        value, eg = _unexpected_summary(r, "unseen")
        return _Outcome(
            True,
            value,
            f"{col}: {value} label values{eg}, expected only {{{_examples(labels, 10)}}}",
            r,
        )

    return describe


def _describe_unique(col: str) -> Callable[[dict[str, Any]], _Outcome]:
    def describe(r: dict[str, Any]) -> _Outcome:
        count = int(r.get("unexpected_count") or 0)
        eg = _eg(r.get("partial_unexpected_list"))
        value = f"{fmt_number(count)} rows share an id{eg}"
        return _Outcome(True, value, f"{col}: {count:,} rows with duplicated ids{eg}", r)

    return describe


def _describe_fresh(
    col: str, now: datetime, max_days: float
) -> Callable[[dict[str, Any]], _Outcome]:
    def describe(r: dict[str, Any]) -> _Outcome:
        seen = r.get("observed_value")
        if seen is None:
            return _Outcome(True, "no timestamps", f"{col}: no timestamps to judge freshness", r)
        newest = _to_utc(pd.Timestamp(seen).to_pydatetime())
        age = (now - newest).total_seconds() / 86400
        value = f"newest {newest.isoformat(timespec='seconds')} ({age:.1f} days old)"
        failure = f"{col}: newest value is {age:.1f} days old > {fmt_number(max_days)} days allowed"
        return _Outcome(True, value, failure, r)

    return describe


def _unexpected_summary(r: dict[str, Any], word: str) -> tuple[str, str]:
    count = int(r.get("unexpected_count") or 0)
    seen = int(r.get("element_count") or 0) - int(r.get("missing_count") or 0)
    share = count / seen if seen else 0.0
    value = f"{fmt_number(count)} of {fmt_number(seen)} ({_pct(share)}) {word}"
    return value, _eg(r.get("partial_unexpected_list"))


def _eg(values: list[Any] | None) -> str:
    return f" (e.g. {_examples(values)})" if values else ""


def _examples(values: Any, limit: int = _EXAMPLES) -> str:
    distinct: list[Any] = []
    for v in values:
        if v not in distinct:
            distinct.append(v)
    shown = ", ".join(_show(v) for v in distinct[:limit])
    return shown + (", …" if len(distinct) > limit else "")


def _show(v: Any) -> str:
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int | float):
        return fmt_number(v, 6)
    return repr(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, str | bool | int) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return str(v)


def _pct(share: float) -> str:
    digits = 2 if 0 < share < 0.01 else 1
    return f"{share:.{digits}%}"


def _rows_bound(lo: int, hi: int | None) -> str:
    if hi is None:
        return f"≥ {fmt_number(lo)}"
    return f"within [{fmt_number(lo)}, {fmt_number(hi)}]"


def _mostly(share: float) -> float:
    # GX rejects mostly outside [0, 1], and 1 - allowed can land a hair outside in floats.
    return min(1.0, max(0.0, share))


def _to_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _is_numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_complex_dtype(s)


def _as_float(s: pd.Series) -> pd.Series:
    """Plain float64, so nullable and boolean dtypes compare like any other number in GX."""
    if pd.api.types.is_float_dtype(s) and not pd.api.types.is_extension_array_dtype(s):
        return s
    return s.astype("float64")


def _as_text(s: pd.Series) -> pd.Series:
    """Category and label values as a categorical of strings, so profile and batch agree
    whatever dtype the file gave them; whole floats read as ints, since an int column turns
    float as soon as a batch has a null in it.

    Categorical rather than object: GX copies and null-scans the frame once per map
    expectation, which on object columns of strings is most of its time on large batches.
    """
    if pd.api.types.is_float_dtype(s) and bool((s.dropna() % 1 == 0).all()):
        s = s.astype("Int64")
    cat = s.astype("category").cat.remove_unused_categories()
    names = [str(v) for v in cat.cat.categories]
    if len(set(names)) == len(names):
        return cat.cat.rename_categories(names)
    # Distinct values with the same text (1 and "1" in one object column) are one category.
    return s.astype(str).where(s.notna(), None).astype("category")


def _quiet_context_config() -> Any:
    """An in-memory context without tqdm progress bars, which GX otherwise writes to stderr
    on every validation."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    return DataContextConfig(
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        store_backend_defaults=InMemoryStoreBackendDefaults(),
    )
