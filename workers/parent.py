"""A child process that ends with the process that started it."""

from __future__ import annotations

import os
import threading
import time


def watch_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    """Exit at once when the process that started this one is gone (also if it died before this process got
    here): a killed worker's replacement waits for its children, and an engine still building itself would
    read its owner's pipe only once built."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(interval_s)

    threading.Thread(target=watch, name="ragq-parent-watch", daemon=True).start()
