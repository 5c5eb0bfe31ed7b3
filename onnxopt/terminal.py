"""What the command lines share with a terminal: one-line option errors (exit 2) and a progress line
that overwrites itself on a terminal and stays silent when piped. ``onnxopt.cli`` and
``onnxopt.bench`` both use it, so neither imports the other."""

from __future__ import annotations

__all__ = ["ArgumentParser", "Progress", "guarded", "EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT"]

import argparse
import sys
import time
from collections.abc import Callable

from onnxopt.errors import OnnxoptError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line and exits 2, like every other user error."""

    def error(self, message: str):  # noqa: D102
        self.exit(EXIT_BAD_INPUT, f"onnxopt: error: {message} (see --help)\n")


class Progress:
    """One self-overwriting status line on a terminal; silent when piped or quiet."""

    def __init__(self, enabled: bool, stream=None):
        # sys.stderr as it is now, not as it was at import: a caller (a test's capture) may have replaced it
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled and hasattr(stream, "isatty") and stream.isatty()
        self._last = 0.0
        self._width = 0

    def clear(self) -> None:
        """Blank the status line, so that a message printed next starts on a clean line."""
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if stage != "done" and now - self._last < 0.1 and done < total:
            return
        self._last = now
        text = "" if stage == "done" else f"onnxopt: {stage} {done}/{total}" if total > 1 else f"onnxopt: {stage}"
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.write("\r" if stage == "done" else "")
        self.stream.flush()
        self._width = len(text)


def guarded(run: Callable[[], int], progress: Progress) -> int:
    """``run()``'s exit code; a user error is one ``onnxopt: error:`` line and exit 2, Ctrl-C one line
    and 130, each on a clean line after any progress (a traceback too: it is a bug)."""
    try:
        return run()
    except OnnxoptError as exc:
        progress.clear()
        print(f"onnxopt: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        progress.clear()
        print("onnxopt: interrupted", file=sys.stderr)
        return 130
    except BaseException:
        progress.clear()
        raise
