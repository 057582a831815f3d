"""Progress and warnings, kept out of the library's return values and off stdout."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

Advance = Callable[..., None]  # advance(count, description=None)


class Reporter:
    """Silent: what library calls get unless the caller wants to see progress."""

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Advance]:
        yield lambda count=1, description=None: None

    def warn(self, message: str) -> None:
        pass

    def info(self, message: str) -> None:
        pass


class ConsoleReporter(Reporter):
    """Rich progress bars, warnings and notes on stderr, so stdout stays pure data."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Advance]:
        if self.quiet:
            yield lambda count=1, description=None: None
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        from rich.text import Text

        class SpeedColumn(ProgressColumn):
            def render(self, task) -> Text:
                speed = task.finished_speed or task.speed
                return Text(f"{speed:,.0f} images/s" if speed else "")

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), SpeedColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total)

            def advance(count: int = 1, description: str | None = None) -> None:
                bar.update(task, advance=count, **({"description": description} if description else {}))

            yield advance

    def warn(self, message: str) -> None:
        from rich.markup import escape

        # paths are user data: a file named "[/x].png" must print as itself, not as markup
        self.console.print(f"[yellow]warning:[/yellow] {escape(message)}", markup=True, highlight=False,
                           soft_wrap=True)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)
