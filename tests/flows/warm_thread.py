"""A module whose import starts a thread: a warm process must refuse to fork after it
(tests/flows/test_warm_start.py)."""

import threading
import time

threading.Thread(target=time.sleep, args=(60,), name="warm-thread-test", daemon=True).start()
