"""What a test's warm process runs for each client (tests/flows/test_warm_start.py): it says
where it runs and what it inherited, then does what WARM_TARGET asks."""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def stop(signum: int, _frame: object) -> None:
    print(f"got signal {signum}", flush=True)
    sys.exit(7)


if __name__ == "__main__":
    ask = os.environ.get("WARM_TARGET", "")
    if ask == "sleep":
        # Before the report: a test signals as soon as it has read it.
        signal.signal(signal.SIGTERM, stop)
    report = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgid(0),
        "cwd": os.getcwd(),
        "argv": sys.argv[1:],
        "ask": ask,
        "preloaded": "decimal" in sys.modules,
        "stdin": sys.stdin.readline().strip() if ask == "stdin" else "",
    }
    print(json.dumps(report), flush=True)
    if ask == "sleep":
        time.sleep(120)
    sys.exit(3)
