"""One logging set-up for scripts and library code."""

import contextlib
import logging
import sys
from typing import Iterator

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def configure_logging(log_file: str | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, when Snakemake gives one, to the rule's log file."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=level, format=_FORMAT, handlers=handlers, force=True)


@contextlib.contextmanager
def script_logging(snakemake) -> Iterator[None]:
    """Set up logging for a workflow script and report user errors plainly.

    A MedrobustError (bad input, bad config) is logged as one clear message and
    ends the job with exit code 1; anything else keeps its traceback, since it
    is a bug.
    """
    from medrobust.errors import MedrobustError

    configure_logging(snakemake.log[0] if snakemake.log else None)
    try:
        yield
    except MedrobustError as error:
        logging.getLogger("medrobust").error("%s", error)
        sys.exit(1)
