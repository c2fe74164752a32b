"""A progress bar on stderr under the table rows printed to stdout (drawn only on a terminal)."""

from __future__ import annotations

import shutil
import sys
import time


class Progress:
    """``total`` steps; :meth:`step` names the one starting, :meth:`print` writes a table line above the bar."""

    def __init__(self, total: int, enabled: bool | None = None):
        self.total, self.done, self.label = max(total, 1), 0, ""
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()

    def step(self, label: str) -> None:
        self.label = label
        self._draw()

    def advance(self) -> None:
        self.done += 1
        self._draw()

    def print(self, line: str = "") -> None:
        self._clear()
        print(line, flush=True)
        self._draw()

    def close(self) -> None:
        self._clear()

    def _clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def _draw(self) -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * self.done / self.total)
        elapsed = time.perf_counter() - self.t0
        text = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:5.0f}s  {self.label}"
        cols = shutil.get_terminal_size((100, 20)).columns
        sys.stderr.write("\r\033[K" + text[: cols - 1])
        sys.stderr.flush()
