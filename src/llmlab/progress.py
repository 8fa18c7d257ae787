"""A progress bar (rich) for anything longer than a few seconds; a no-op when disabled or not a terminal."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Bar:
    """bar = Bar(total, "training"); bar.update(n); bar.close() -- or use it as a context manager."""

    def __init__(self, total: int | None, description: str, enabled: bool = True):
        self._progress = None
        if enabled and sys.stderr.isatty():
            # Drawn on stderr, the terminal just checked: rich's default console is stdout, where the bar would
            # vanish when stdout is redirected (leaving a stray newline in the command's output) and mix with it
            # when not.
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), transient=True,
                                      console=Console(stderr=True))
            self._progress.start()
            self._task = self._progress.add_task(description, total=total)

    def update(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
