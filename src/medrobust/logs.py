"""One logging set-up for scripts and library code."""

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def configure_logging(log_file: str | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, when Snakemake gives one, to the rule's log file."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=level, format=_FORMAT, handlers=handlers, force=True)
