"""Progress bars with ETA for long loops in the runtime (rich, which textual already brings).

On a terminal: a live bar. Redirected to a file or CI log: one plain line per ~10 % with the ETA, since a
live bar would print nothing until the end."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True):
    """Yields advance(n) -> None. Disabled bars cost nothing (tests, --json runs)."""
    if not enabled:
        yield lambda n=1: None
        return
    if not sys.stderr.isatty():
        yield _LineProgress(description, total).advance
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    ) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)


class _LineProgress:
    def __init__(self, description: str, total: int):
        self.description, self.total, self.done = description, max(total, 1), 0
        self.t0, self.next_report = time.perf_counter(), 0.1

    def advance(self, n: int = 1) -> None:
        self.done += n
        frac = self.done / self.total
        if frac + 1e-9 >= self.next_report or self.done >= self.total:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / frac - elapsed if frac > 0 else 0.0
            print(
                f"{self.description}: {self.done}/{self.total} ({100 * frac:.0f} %), "
                f"{elapsed:.0f} s elapsed, eta {eta:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            while self.next_report <= frac:
                self.next_report += 0.1
