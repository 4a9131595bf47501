"""Running one task per call: on the configured Dask scheduler's workers, side by side, or
here one after another (the training flow's candidates, batch scoring's partitions).

With `dask.scheduler_address` the tasks go through prefect-dask's `DaskTaskRunner` to that
scheduler's workers. They are handed to the runner directly rather than through a subflow:
a subflow's arguments are sent to the Prefect API as its run's parameters, and these are
data frames, models and plans.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.config import ConfigError, DaskConfig


def run_tasks(
    fn: Any,
    calls: list[dict[str, Any]],
    parallel: DaskConfig,
    on_result: Callable[[Any], None] | None = None,
) -> list[Any]:
    """The task `fn` once per call (its keyword arguments), results in the order of the
    calls: on the configured Dask scheduler's workers, side by side, or here one after
    another. `on_result` sees each result as it is collected."""
    address = parallel.scheduler_address
    if address is None:
        results = []
        for call in calls:
            results.append(fn(**call))
            if on_result is not None:
                on_result(results[-1])
        return results
    import dask
    from prefect.settings import get_current_settings
    from prefect_dask import DaskTaskRunner

    # A task on a worker reports to the API the flow uses. Prefect's embedded API is a
    # temporary server of this process whose address the workers are not given: each would
    # start one of its own for every run (minutes each; on another host, another database).
    if not get_current_settings().api.url:
        raise ConfigError(
            f"dask.scheduler_address is set ({address}) but the flow runs on "
            "Prefect's embedded API, which the Dask workers cannot reach: set "
            "orchestration.api_url to the Prefect server the workers reach too (team mode), "
            "or unset dask.scheduler_address to run the tasks here"
        )

    with DaskTaskRunner(address=address) as runner:
        # Dask places many small tasks well, but may pile a handful of long ones onto one
        # worker (seen on a busy host). Each call prefers the next worker in turn, and may
        # still go elsewhere (a loose restriction) when that one is busy or gone.
        workers = sorted(runner.client.nthreads())
        futures = []
        for i, call in enumerate(calls):
            prefer = {"workers": [workers[i % len(workers)]], "allow_other_workers": True}
            with dask.annotate(**(prefer if workers else {})):
                futures.append(runner.submit(fn, call))
        results = []
        for future in futures:
            results.append(future.result())
            if on_result is not None:
                on_result(results[-1])
        return results
