"""The `mlgate canary` commands: start, resume, status, abort and stop a canary rollout, and
the console lines and status table a person reads while one runs.

What the controller does is in `services/canary.py`; this module only calls it and renders
what it recorded (the state file) and what HAProxy says now. Exit statuses as for every
`mlgate` command (`flows/cli_common.py`): `start` and `resume` exit 0 when the candidate is
promoted and 3 when it is rolled back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from flows.cli_common import (
    EXIT_OK,
    EXIT_REJECTED,
    ConfigOpt,
    JsonOpt,
    ReasonOpt,
    console,
    exit_error,
    load_config_or_exit,
)

if TYPE_CHECKING:
    from models.config import MlgateConfig
    from services.canary_state import CanaryState

canary_app = typer.Typer(
    help="Canary rollouts: a candidate earns @champion on live traffic through HAProxy.",
    no_args_is_help=True,
)

# Events worth a line on the console while the controller walks the steps.
_CANARY_EVENTS = {
    "haproxy_started",
    "stable_started",
    "canary_started",
    "baseline_measured",
    "step_started",
    "step_passed",
    "rollback_decided",
    "canary_weight_zero",
    "promoted",
    "stable_reloaded",
    "rolled_back",
    "done",
    "superseded",
    "resumed",
    "controller_error",
}


def _canary_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from flows.registry import RegistryError
    from services.canary_state import CanaryError
    from services.haproxy import HAProxyError
    from services.launcher import ServiceStartError

    try:
        return fn(*args, **kwargs)
    except (RegistryError, CanaryError, HAProxyError, ServiceStartError) as err:
        raise exit_error(str(err)) from None


def print_canary_event(state: CanaryState, event: str) -> None:
    """One console line per notable controller event (the demo prints the same)."""
    if event not in _CANARY_EVENTS:
        return
    last = state.events[-1] if state.events else {}
    details = ", ".join(f"{k}={v}" for k, v in last.items() if k not in ("at", "event"))
    if event == "step_passed" and state.steps_done:
        details = state.steps_done[-1].result.reason
    console.print(
        f"[dim]{last.get('at', '')}[/] canary v{state.candidate_version} "
        f"[bold]{event}[/] weights {state.weights['stable']}/{state.weights['canary']}"
        + (f": {details}" if details else ""),
        highlight=False,
    )


@dataclass(frozen=True)
class CanaryStatus:
    """What `mlgate canary status` shows: the recorded state, whether a controller runs
    it, and HAProxy's live view of its servers."""

    state: CanaryState | None
    controller_running: bool
    live: dict[str, dict[str, Any]]
    state_file: str

    def to_dict(self) -> dict[str, Any]:
        from services.canary_state import jsonable

        s = self.state
        if s is None:
            return {
                "canary": None,
                "controller_running": self.controller_running,
                "state_file": self.state_file,
            }
        current_percent = s.steps[s.step_index] if s.step_index < len(s.steps) else None
        last = (s.current or {}).get("last_result") or {}
        return jsonable(
            {
                "model": s.model_name,
                "phase": s.phase,
                "candidate_version": s.candidate_version,
                "stable_version": s.stable_version,
                "steps": s.steps,
                "step_index": s.step_index,
                "step_percent": current_percent,
                "weights": s.weights,
                "public_url": s.public_url,
                "controller_running": self.controller_running,
                "resumes": s.resumes,
                "steps_done": [
                    {
                        "percent": d["percent"],
                        "status": d["result"]["status"],
                        "seconds": d.get("seconds"),
                        "haproxy": d.get("haproxy"),
                        "metrics": d["result"]["metrics"],
                    }
                    for d in (step.to_dict() for step in s.steps_done)
                ],
                "current": {
                    "percent": (s.current or {}).get("percent"),
                    "ticks": (s.current or {}).get("ticks"),
                    "status": last.get("status"),
                    "reason": last.get("reason"),
                }
                if s.current
                else None,
                "decision": {k: v for k, v in (s.decision or {}).items() if k != "result"} or None,
                "abort_requested": s.abort_requested,
                "pending_candidate": s.pending_candidate,
                "live": self.live,
                "state_file": self.state_file,
            }
        )


def canary_status(cfg: MlgateConfig) -> CanaryStatus:
    """The recorded state, whether a controller runs it, and HAProxy's live weights and
    server status when HAProxy answers."""
    from services.canary_state import StateStore, canary_paths, controller_running
    from services.canary_windows import live_servers

    paths = canary_paths(cfg)
    state = StateStore(paths).read()
    live: dict[str, dict[str, Any]] = {}
    if state is not None and state.haproxy is not None:
        live = live_servers(Path(state.haproxy.socket))
    return CanaryStatus(state, controller_running(cfg), live, str(paths.state))


def _run_controller(
    cfg: Any, config: Path, version: str | None = None, not_before: float = 0.0
) -> None:
    """Run the controller to the end; the verdict shown (and the exit status) is that of
    `version`'s canary when given (the controller may go on with a newer one after it)."""
    from flows.canary import MlflowCanaryRegistry, decision_result
    from flows.gate_tables import gate_tables
    from services.canary import run_canary
    from services.canary_state import Phase, final_state_for

    try:
        state = _canary_call(
            run_canary, cfg, config, MlflowCanaryRegistry(cfg), on_event=print_canary_event
        )
        if version is not None:
            state = final_state_for(cfg, version, not_before) or state
    except KeyboardInterrupt:
        from services.canary_state import StateStore, canary_paths

        left = StateStore(canary_paths(cfg)).read()
        where = (
            f"{left.phase}, weights stable {left.weights['stable']} / canary "
            f"{left.weights['canary']}"
            if left
            else "no state"
        )
        raise exit_error(
            f"controller interrupted ({where}); the state is kept: `mlgate canary resume` "
            "carries on, `mlgate canary abort` rolls back"
        ) from None
    console.print(gate_tables([decision_result(state)]))
    decision = state.decision or {}
    if state.phase == Phase.PROMOTED:
        console.print(f"[green]PROMOTED[/] v{state.candidate_version} is @champion")
        raise typer.Exit(EXIT_OK)
    console.print(
        f"[bold red]ROLLED BACK[/] v{state.candidate_version} at guardrail "
        f"{decision.get('guardrail')}: {decision.get('reason')}; "
        f"@champion stays v{state.stable_version}",
        highlight=False,
    )
    raise typer.Exit(EXIT_REJECTED)


@canary_app.command("start")
def canary_start(
    version: Annotated[str, typer.Argument(help="Candidate version.")],
    config: ConfigOpt = Path("mlgate.yaml"),
    port: Annotated[
        int | None, typer.Option("--port", help="HAProxy's public port (default from config).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Start without passing offline evidence (recorded).")
    ] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why, with --force.")] = "",
    detach: Annotated[
        bool, typer.Option("--detach", help="Run the controller in the background.")
    ] = False,
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth",
            help="Start even without API keys: anyone who reaches the port may use the models.",
        ),
    ] = False,
) -> None:
    """Put VERSION on live traffic beside @champion and walk the steps. Refuses to open the
    public port without an API key (`mlgate keys create`) unless --insecure-no-auth is given.

    Exit 0 when it is promoted, 3 when it is rolled back. A newer candidate given while a
    canary runs replaces the older one, and the running controller restarts its analysis
    with it."""
    import subprocess
    import sys

    from flows.canary import begin_canary
    from flows.cli_keys import require_api_keys
    from services.canary_state import canary_paths, controller_running

    cfg = load_config_or_exit(config)
    public_port = port or cfg.canary.public_port or cfg.serving.port
    require_api_keys(cfg, config, f"http://{cfg.serving.host}:{public_port}", insecure_no_auth)
    state = _canary_call(begin_canary, cfg, version, force=force, reason=reason, public_port=port)
    if state.candidate_version != version:
        console.print(
            f"v{version} replaces the canary of v{state.candidate_version}: the controller "
            "restarts its analysis with it"
            + ("" if controller_running(cfg) else "; run `mlgate canary resume`")
        )
        return
    console.print(
        f"canary of {cfg.registry.model_name} v{version} against @champion "
        f"v{state.stable_version} on {state.public_url}: steps "
        f"{', '.join(f'{p}%' for p in state.steps)}, judged every {cfg.canary.interval_s:g} s"
    )
    if detach:
        if controller_running(cfg):
            console.print("a controller already runs this canary; `mlgate canary status`")
            return
        log = canary_paths(cfg).root / "controller.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "canary", "resume", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        console.print(f"controller running in the background (pid {proc.pid}, log {log})")
        return
    _run_controller(cfg, config, version, state.started_at)


@canary_app.command("resume")
def canary_resume(config: ConfigOpt = Path("mlgate.yaml")) -> None:
    """Carry on the recorded canary after its controller stopped.

    A step under analysis is analysed again from fresh counters; a decision already taken
    is carried out."""
    _run_controller(load_config_or_exit(config), config)


@canary_app.command("status")
def canary_status_cmd(config: ConfigOpt = Path("mlgate.yaml"), as_json: JsonOpt = False) -> None:
    """The canary's phase, step, weights, each step's verdict and HAProxy's live counters."""
    status = canary_status(load_config_or_exit(config)).to_dict()
    if as_json:
        print(json.dumps(status, indent=2))
        return
    if status.get("canary", "") is None:
        console.print(f"no canary recorded ({status['state_file']})")
        return
    console.print(
        f"{status['model']} v{status['candidate_version']} against v{status['stable_version']}: "
        f"[bold]{status['phase']}[/], step {status['step_percent']}% "
        f"(weights stable {status['weights']['stable']} / canary {status['weights']['canary']}), "
        f"controller {'running' if status['controller_running'] else 'not running'}, "
        f"public {status['public_url']}",
        highlight=False,
    )
    table = Table(title="steps")
    for col in ("step", "status", "stable / canary responses", "seconds"):
        table.add_column(col)
    for d in status["steps_done"]:
        counts = d.get("haproxy") or {}
        table.add_row(
            f"{d['percent']}%",
            d["status"],
            f"{counts.get('stable', {}).get('responses', '?')} / "
            f"{counts.get('canary', {}).get('responses', '?')}",
            str(d.get("seconds")),
        )
    if status.get("current"):
        cur = status["current"]
        table.add_row(f"{cur['percent']}%", cur.get("status") or "analysing", "", "")
    console.print(table)
    if status.get("decision"):
        d = status["decision"]
        console.print(f"decision: {d['outcome']} ({d.get('guardrail')}): {d['reason']}")
    for name, live in status.get("live", {}).items():
        console.print(f"HAProxy {name}: {live}", highlight=False)


@canary_app.command("abort")
def canary_abort(reason: ReasonOpt, config: ConfigOpt = Path("mlgate.yaml")) -> None:
    """Roll the canary back now: weight 0, canary stopped, version tagged, @champion kept."""
    from flows.canary import MlflowCanaryRegistry
    from services.canary import abort_canary

    cfg = load_config_or_exit(config)
    # A running controller may be starting an instance: allow for that before giving up.
    wait_s = cfg.canary.start_timeout_s + cfg.canary.drain_timeout_s + 60.0
    state = _canary_call(
        abort_canary, cfg, reason, MlflowCanaryRegistry(cfg), config_path=config, wait_s=wait_s
    )
    if state.phase != "rolled_back":
        raise exit_error(
            f"canary of v{state.candidate_version} ended {state.phase}, not rolled back"
        )
    console.print(
        f"canary of v{state.candidate_version} rolled back; @champion stays v{state.stable_version}"
    )


@canary_app.command("stop")
def canary_stop(
    config: ConfigOpt = Path("mlgate.yaml"),
    force: Annotated[
        bool, typer.Option("--force", help="Also while a canary is under way (untagged).")
    ] = False,
) -> None:
    """Stop the canary target: HAProxy and every instance it started."""
    from services.canary import stop_target

    _canary_call(stop_target, load_config_or_exit(config), force=force)
    console.print("canary target stopped")
