"""One progress bar for every long loop: on the console, and a summary line in the log.

Use `progress(...)` wherever a loop would call tqdm; it takes tqdm's arguments
(an iterable or `total=`, `desc`, `unit`, `leave`, `unit_scale`, ...). How the
bar shows depends on where stderr goes:

- an interactive terminal, outside a workflow job: tqdm's usual bar, redrawn in
  place;
- inside a workflow job (`medrobust.logs.script_logging` or `job_logging` names it) or
  when stderr is not a terminal (a pipe, a file, a SLURM log): no carriage
  return redraws but whole lines, each naming the job, written in one piece
  at most every `MEDROBUST_PROGRESS_INTERVAL` seconds (10 s on a terminal,
  30 s otherwise), none at the start and none at the end. Several jobs side
  by side then interleave whole lines rather than fragments of each other's
  bars, and a loop shorter than the interval prints no bar line at all.

Either way, when the bar closes (the loop ends, breaks or fails) one line
"<desc>: N <unit> in T s (rate)" goes to the logger, hence to the rule's log
file.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Iterable

from tqdm import tqdm

from medrobust.logs import get_logger, job_name

log = get_logger(__name__)

INTERVAL_ENV = "MEDROBUST_PROGRESS_INTERVAL"
TERMINAL_INTERVAL_S = 10.0
PIPE_INTERVAL_S = 30.0
_BAR_FORMAT = ("{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} {unit} "
               "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
_COUNT_FORMAT = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def line_interval(terminal: bool) -> float:
    """Seconds between two progress lines (env `MEDROBUST_PROGRESS_INTERVAL` overrides)."""
    value = os.environ.get(INTERVAL_ENV)
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            log.warning("%s=%r is not a number of seconds; ignored", INTERVAL_ENV, value)
    return TERMINAL_INTERVAL_S if terminal else PIPE_INTERVAL_S


class Progress(tqdm):
    """tqdm that logs a summary when it closes and, in line mode, prints whole lines."""

    def __init__(self, *args, line_mode: bool = False, job: str | None = None,
                 logger: logging.Logger | None = None, **kwargs):
        self._line_mode = line_mode
        self._job = job
        self._logger = logger or log
        self._summarised = False
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if not self._line_mode:
            return super().display(msg, pos)
        if msg is None:
            fmt = _BAR_FORMAT if self.total else _COUNT_FORMAT
            msg = self.format_meter(**{**self.format_dict, "bar_format": fmt})
        if not msg:  # tqdm clearing the bar: nothing to take back in line mode
            return False
        if self._job:
            msg = f"[{self._job}] {msg}"
        self.fp.write(msg + "\n")  # one write per line, so parallel jobs never split it
        self.fp.flush()
        return True

    def close(self) -> None:
        if not self._summarised and hasattr(self, "start_t"):
            self._summarised = True
            self._logger.info("%s", self.summary())
        super().close()

    def summary(self) -> str:
        """'<desc>: N <unit> in T s (rate)', or 'stopped at n/total' for an unfinished loop."""
        info = self.format_dict
        done = info["n"] - (info["initial"] or 0)
        elapsed = info["elapsed"]
        unit, scale, divisor = info["unit"], info["unit_scale"], info["unit_divisor"]

        def amount(value: float) -> str:
            if scale:
                return self.format_sizeof(value, unit, divisor)
            number = str(int(value)) if float(value).is_integer() else f"{value:.3g}"
            return f"{number} {unit}"

        if elapsed <= 0:
            rate = "rate n/a"
        elif scale:
            rate = f"{amount(done / elapsed)}/s"
        else:
            rate = f"{done / elapsed:.3g} {unit}/s"
        label = info["prefix"] or "progress"
        total = info["total"]
        if total is not None and info["n"] < total:
            return (f"{label}: stopped at {amount(info['n'])} of {amount(total)} "
                    f"after {elapsed:.1f} s ({rate})")
        return f"{label}: {amount(done)} in {elapsed:.1f} s ({rate})"


def progress(iterable: Iterable[Any] | None = None, *, desc: str, unit: str = "it",
             logger: logging.Logger | None = None, **kwargs: Any) -> Progress:
    """A progress bar over `iterable` (or a manual one with `total=`) on stderr.

    Takes tqdm's keyword arguments; the bar always writes to stderr, and in
    line mode `mininterval`, `maxinterval`, `delay`, `disable` and `leave` are
    chosen here (see the module docstring).
    """
    stream = sys.stderr
    terminal = _is_terminal(stream)
    job = job_name()
    line_mode = job is not None or not terminal
    kwargs.pop("file", None)
    if line_mode:
        for chosen in ("mininterval", "maxinterval", "delay", "disable"):
            kwargs.pop(chosen, None)
        interval = line_interval(terminal)
        kwargs.update(mininterval=interval, maxinterval=max(interval, 1.0), delay=interval,
                      leave=False, ascii=True, dynamic_ncols=False)
    else:
        kwargs.setdefault("dynamic_ncols", True)
    return Progress(iterable, desc=desc, unit=unit, file=stream, line_mode=line_mode,
                    job=job, logger=logger, **kwargs)


__all__ = ["Progress", "progress", "line_interval"]
