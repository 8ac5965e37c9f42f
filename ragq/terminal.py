"""Terminal helpers of the CLI: following a job with a progress bar, and single key presses for `ragq top`."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console

from ragq.core.errors import JobStillRunning


def wait_with_progress(client: Any, job_id: str, timeout: float | None, show: bool, console: Console) -> dict[str, Any]:
    """The job's final status; or, when `timeout` passes first, its last status with "still_running" set to the
    message to show (the job goes on)."""
    try:
        return _follow(client, job_id, timeout, show, console)
    except JobStillRunning as exc:
        return {**exc.status, "still_running": str(exc)}


def _follow(client: Any, job_id: str, timeout: float | None, show: bool, console: Console) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not show:
        return dict(client.wait_for_job(job_id, timeout_s=timeout))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[chunks]} chunks"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("working", total=None, chunks=0)

        def update(status: dict[str, Any]) -> None:
            if status.get("kind") == "questions":
                progress.update(task, description="answering", total=status["questions_total"], chunks="-",
                                completed=status["questions_done"] + status["questions_failed"])
                return
            progress.update(task, description="ingesting", total=status["documents_total"], chunks=status["chunks_total"],
                            completed=status["documents_done"] + status["documents_failed"])

        return dict(client.wait_for_job(job_id, timeout_s=timeout, on_progress=update))


@contextlib.contextmanager
def keys() -> Iterator[Callable[[float], str | None]]:
    """`pressed(timeout_s)`: the key typed within the timeout (one character, no Enter needed), else None; on a
    terminal only (elsewhere it just waits)."""
    import select
    import termios
    import time
    import tty

    if not sys.stdin.isatty():
        def wait(timeout_s: float) -> str | None:
            time.sleep(timeout_s)
            return None

        yield wait
        return
    saved = termios.tcgetattr(sys.stdin)
    tty.setcbreak(sys.stdin.fileno())

    def read(timeout_s: float) -> str | None:
        ready, _, _ = select.select([sys.stdin], [], [], timeout_s)
        return sys.stdin.read(1).lower() if ready else None

    try:
        yield read
    finally:
        termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
