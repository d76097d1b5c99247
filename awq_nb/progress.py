"""Progress of long steps (load, capture, search, save, eval) as ``progress(done, total, desc)`` events.

The algorithm modules only call a callback; what the user sees is chosen here (or by the widget,
which takes the same events):

* on a terminal or in a notebook, a tqdm bar per stage, with rate and ETA;
* in a log (stderr is not a terminal: CI, ``nohup``, a pipe), one plain line at the start and then
  about every 10 %, with the rate and the ETA: no carriage-return frames piling up in the file.

``done`` counts finished units, so ``progress(i, n, "searching block i+1/n")`` is sent when unit
``i`` starts and ``progress(n, n, ...)`` at the end.
"""
from __future__ import annotations

import sys
import time
from typing import Callable

Progress = Callable[[int, int, str], None]


def silent(done: int, total: int, desc: str = "") -> None:
    """A progress callback that shows nothing."""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _interactive(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)()) or "ipykernel" in sys.modules


class ConsoleProgress:
    """One stage's progress on ``stream`` (default stderr): a tqdm bar when interactive, else plain
    lines every ``every`` of the way. Call it as a :data:`Progress` callback."""

    def __init__(self, stage: str, unit: str = "step", stream=None, every: float = 0.1,
                 interactive: bool | None = None, extra: Callable[[], str] | None = None):
        self.stage, self.unit, self.every, self.extra = stage, unit, every, extra
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = _interactive(self.stream) if interactive is None else interactive
        self.t0: float | None = None
        self.bar = None
        self.next_report = 0.0
        self.printed = False
        self.closed = False

    def __call__(self, done: int, total: int, desc: str = "") -> None:
        if self.closed:
            return
        total = max(int(total), 1)
        done = min(max(int(done), 0), total)
        if self.t0 is None:
            self.t0 = time.perf_counter()
        if self.interactive:
            self._bar(done, total, desc)
        else:
            self._line(done, total, desc)
        if done >= total:
            self.closed = True
            if self.bar is not None:
                self.bar.close()

    def _bar(self, done: int, total: int, desc: str) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.stage, unit=self.unit, file=self.stream)
        if desc or self.extra:
            self.bar.set_postfix_str(", ".join(x for x in (desc, self.extra() if self.extra else "") if x), refresh=False)
        self.bar.update(done - self.bar.n)

    def _line(self, done: int, total: int, desc: str) -> None:
        fraction = done / total
        if done < total and (fraction < self.next_report or (done == 0 and self.printed)):
            return
        self.printed = True
        self.next_report = (int(fraction / self.every) + 1) * self.every
        elapsed = time.perf_counter() - self.t0
        parts = [f"[awq-nb] {self.stage}: {done}/{total} {self.unit}s ({100 * fraction:.0f}%)"]
        if done:
            parts.append(f"{elapsed / done:.2f} s/{self.unit}")
            parts.append(f"done in {_duration(elapsed)}" if done >= total else f"ETA {_duration(elapsed / done * (total - done))}")
        if self.extra:
            parts.append(self.extra())
        line = ", ".join(parts) + (f" - {desc}" if desc else "")
        print(line, file=self.stream, flush=True)


def console_progress(stage: str, unit: str = "step", show_rss: bool = False) -> Progress:
    """The default callback of a long step: see :class:`ConsoleProgress`; ``show_rss`` adds the
    process's current resident memory to every report."""
    extra = None
    if show_rss:
        from .memory import current_rss_bytes

        extra = lambda: f"RSS {current_rss_bytes() / 1e9:.2f} GB"  # noqa: E731
    return ConsoleProgress(stage, unit, extra=extra)
