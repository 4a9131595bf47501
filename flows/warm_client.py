"""The command a process worker runs for each flow run: the run forked from its worker's warm
process (flows/warm_start.py) when that process listens, else `python -m prefect.engine` in
this process, which is what Prefect runs by default.

Light on purpose: it imports nothing beyond the standard library (and flows/warm_start.py's
own, which are standard too), so it starts in a few tens of milliseconds. Which warm process
is this worker's: `<socket dir>/<worker name>.sock`, the directory from the command line (the
stack's, put there by flows/deploy.py) and the worker's name from PREFECT__WORKER_NAME, which
the worker sets for each of its runs as it sets PREFECT__FLOW_RUN_ID.

While the forked run goes on, this process stands in for it: the worker's signals
(cancellation's SIGTERM, SIGINT, SIGHUP) go to the run's session, and its exit code is this
process's. If this process is SIGKILLed, the warm process kills the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path

from flows.warm_start import HEADER, in_directory, socket_path

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def cold_start(argv: list[str]) -> None:
    """Become `python -m prefect.engine`: what the worker runs without a warm process."""
    os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *argv])


def connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with in_directory(path.parent):
            sock.connect(path.name)
    except OSError:
        sock.close()
        return None
    return sock


def warm_start(sock: socket.socket, argv: list[str]) -> int | None:
    """Run in the warm process; returns the run's exit code, or None when it never started
    (then a cold start is still safe)."""
    run: list[int] = []  # the run's pid, once the warm process has said it
    pending: list[int] = []  # signals that came before that

    def forward(signum: int, _frame: object = None) -> None:
        if not run:
            pending.append(signum)
            return
        # The run leads its own session once it has called setsid; until then, itself.
        try:
            os.killpg(run[0], signum)
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(run[0], signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    body = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    socket.send_fds(sock, [HEADER.pack(len(body)) + body], [0, 1, 2])
    lines = sock.makefile("r", encoding="utf-8")
    first = lines.readline().strip()
    if not first.startswith("pid "):
        if pending:
            # Stopped before any run started: nothing to start cold either.
            return 128 + pending[0]
        print(f"warm start refused ({first or 'no answer'}): starting cold", file=sys.stderr)
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        return None
    run.append(int(first.split()[1]))
    for signum in pending:
        forward(signum)
    last = lines.readline().strip()
    if last.startswith("exit "):
        return int(last.split()[1])
    print(f"the warm process went away during run pid {run[0]}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.warm_client")
    parser.add_argument("--socket-dir", type=Path, required=True)
    parser.add_argument("engine_args", nargs="*", help="passed on to prefect.engine")
    args = parser.parse_args(argv)
    worker = os.environ.get("PREFECT__WORKER_NAME", "")
    sock = connect(socket_path(args.socket_dir, worker)) if worker else None
    if sock is not None:
        with sock:
            code = warm_start(sock, args.engine_args)
        if code is not None:
            return code
    cold_start(args.engine_args)
    return 1  # not reached: execv replaced this process


if __name__ == "__main__":
    sys.exit(main())
