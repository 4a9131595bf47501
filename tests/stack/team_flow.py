"""A flow run as a team-mode host runs one (the stack tier starts it in a fresh process):
the config's client settings applied before Prefect is imported, the flow on the Prefect
server, its tasks on the Dask scheduler's workers. Prints one JSON line: the flow run's id,
its final state and the pids that ran the tasks."""

from __future__ import annotations

import json
import os
import sys

from flows.runtime import use_team_servers
from models.config import load_config


def main(config_path: str) -> None:
    cfg = load_config(config_path)
    use_team_servers(cfg.registry, cfg.orchestration)

    from prefect import flow, task
    from prefect.context import get_run_context
    from prefect_dask import DaskTaskRunner

    @task
    def worker_pid(i: int) -> int:
        return os.getpid()

    @flow(task_runner=DaskTaskRunner(address=cfg.dask.scheduler_address))
    def team_smoke() -> dict[str, object]:
        futures = [worker_pid.submit(i) for i in range(4)]
        run_id = str(get_run_context().flow_run.id)  # type: ignore[union-attr]
        return {"flow_run_id": run_id, "task_pids": [f.result() for f in futures]}

    state = team_smoke(return_state=True)
    print(json.dumps({**state.result(), "state": state.type.value}))


if __name__ == "__main__":
    main(sys.argv[1])
