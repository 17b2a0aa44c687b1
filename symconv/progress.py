"""Progress bars for long runs and stage logging for ``--verbose``.

A :class:`Progress` bar draws itself on a terminal only: on a pipe, a file
or a CI log it writes nothing (unless forced), so output that is read by
programs stays clean.  Log records (``logging.getLogger("symconv")``) go
through :func:`configure`, whose handler lifts the bar off the line before
writing a record and draws it again after, so the two never garble each
other.  Standard library only.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import IO

log = logging.getLogger("symconv")

_active: "Progress | None" = None
_lock = threading.RLock()


def is_terminal(stream: IO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(value), 60)
    return f"{minutes}:{seconds:02d}"


class Progress:
    """``[#######.......]  7/20  12.3 s  eta 17.5 s  <note>`` on one terminal line.

    ``enabled`` defaults to whether ``stream`` (default stderr) is a terminal.  Use as a
    context manager; ``advance(note)`` after each item, ``write(text, file)`` to print a
    line above the bar.
    """

    def __init__(self, total: int, label: str = "", stream: IO | None = None,
                 enabled: bool | None = None, width: int = 28):
        self.total = max(int(total), 0)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = is_terminal(self.stream) if enabled is None else enabled
        self.width = width
        self.done = 0
        self.note = ""
        self.start = time.perf_counter()
        self._drawn = False

    # --- drawing -----------------------------------------------------------------------------
    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        fraction = self.done / self.total if self.total else 1.0
        filled = int(round(self.width * fraction))
        bar = "#" * filled + "." * (self.width - filled)
        eta = ""
        if 0 < self.done < self.total:
            eta = f"  eta {_seconds(elapsed / self.done * (self.total - self.done))}"
        label = f"{self.label} " if self.label else ""
        note = f"  {self.note}" if self.note else ""
        return f"{label}[{bar}] {self.done}/{self.total}  {_seconds(elapsed)}{eta}{note}"

    def draw(self) -> None:
        if not self.enabled:
            return
        with _lock:
            self.stream.write("\r\x1b[2K" + self.line()[:200])
            self.stream.flush()
            self._drawn = True

    def clear(self) -> None:
        if self.enabled and self._drawn:
            with _lock:
                self.stream.write("\r\x1b[2K")
                self.stream.flush()
                self._drawn = False

    # --- use ---------------------------------------------------------------------------------
    def __enter__(self) -> "Progress":
        global _active
        self.start = time.perf_counter()
        with _lock:
            _active = self
        self.draw()
        return self

    def __exit__(self, *exc) -> None:
        global _active
        with _lock:
            if _active is self:
                _active = None
        if self.enabled and self._drawn:
            with _lock:
                if exc[0] is None:
                    self.stream.write("\r\x1b[2K" + self.line()[:200] + "\n")
                else:
                    self.stream.write("\r\x1b[2K")
                self.stream.flush()
                self._drawn = False

    def set_note(self, note: str) -> None:
        self.note = note
        self.draw()

    def advance(self, note: str = "") -> None:
        self.done += 1
        self.note = note
        self.draw()

    def write(self, text: str, file: IO | None = None) -> None:
        """Print ``text`` on its own line (to ``file``, default the bar's stream) above the bar."""
        file = file if file is not None else self.stream
        with _lock:
            self.clear()
            print(text, file=file, flush=True)
            self.draw()




class _BarAwareHandler(logging.StreamHandler):
    """A stream handler that lifts the active progress bar before each record."""

    def emit(self, record: logging.LogRecord) -> None:
        with _lock:
            bar = _active
            if bar is not None and bar.stream is self.stream:
                bar.clear()
            super().emit(record)
            if bar is not None and bar.stream is self.stream:
                bar.draw()


_handler: logging.Handler | None = None
_saved_level: int = logging.NOTSET


def configure(verbose: bool, stream: IO | None = None) -> None:
    """With ``verbose``, log symconv's stages at INFO to ``stream`` (default stderr); without,
    undo that (warnings then reach stderr through Python's default).  Safe to call again."""
    global _handler, _saved_level
    logger = logging.getLogger("symconv")
    if _handler is not None:
        logger.removeHandler(_handler)
        logger.setLevel(_saved_level)
        _handler = None
    if verbose:
        _handler = _BarAwareHandler(stream if stream is not None else sys.stderr)
        _handler.setFormatter(logging.Formatter("symconv: %(message)s"))
        _saved_level = logger.level
        logger.addHandler(_handler)
        logger.setLevel(logging.INFO)
