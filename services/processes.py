"""Processes known only by pid: whether one still runs, its descendants, and signalling them.

The canary target's processes (HAProxy and the BentoML instances) outlive the controller
that started them, so a controller that restarts knows them only by pid. A pid is trusted
only while the process's start time (field 22 of /proc/<pid>/stat) is the one recorded at
launch: pids are reused.

The opposite case, a child that must not outlive its parent however the parent dies
(SIGKILL included), is Linux's PR_SET_PDEATHSIG (`die_with_parent_preexec`). The standard
library has no prctl and python-prctl needs libcap headers to build, so it is called
through ctypes; libc's prctl is resolved in the parent, since the child runs it between
fork and exec, where loading a library could deadlock on a lock another thread held.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen`: the child gets `sig` when the thread that
    started it dies. None where the kernel has no such thing (not Linux)."""
    prctl = _prctl
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os.kill(os.getpid(), sig)

    return preexec


def _proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    return raw[raw.rindex(")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """Alive and not a zombie; with `start_time`, also the same process as recorded."""
    with contextlib.suppress(ChildProcessError, OSError):
        # Our own child that exited stays a zombie until reaped.
        os.waitpid(pid, os.WNOHANG)
    fields = _proc_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start_time is None or int(fields[19]) == start_time


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, parents first. BentoML's workers lead sessions of their
    own, so signalling the server's process group does not reach them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [c for p in frontier for c in children.get(p, [])]
        tree.extend(frontier)
    return tree


def signal_tree(pid: int, sig: int) -> list[int]:
    """Send `sig` to `pid` and every descendant; returns the pids signalled."""
    tree = process_tree(pid)
    for p in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)
    return tree


def signal_and_wait(
    pid: int,
    sig: int = signal.SIGTERM,
    *,
    timeout: float = 15.0,
    group: bool = False,
    start_time: int | None = None,
) -> None:
    """Send `sig` (to the process group when `group`), wait up to `timeout` for the process
    to go, then SIGKILL. SIGCONT follows the signal, so a stopped process can act on it."""
    if not pid_alive(pid, start_time):
        return
    send = os.killpg if group else os.kill
    with contextlib.suppress(ProcessLookupError, PermissionError):
        send(pid, sig)
        send(pid, signal.SIGCONT)
    deadline = time.monotonic() + timeout
    while pid_alive(pid, start_time):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                send(pid, signal.SIGKILL)
            kill_deadline = time.monotonic() + 5
            while pid_alive(pid, start_time) and time.monotonic() < kill_deadline:
                time.sleep(0.05)
            return
        time.sleep(0.05)
