"""One logging set-up for scripts and library code.

A workflow script runs inside `script_logging(snakemake)` (a shell rule's job
inside `job_logging`, medrobust.slide_jobs), which sends
everything the job says to stderr and to the rule's log file: log records,
warnings (`warnings.warn`, e.g. from pydicom or torch), the one-line summary
of each progress bar (`medrobust.progress`) and, for an unexpected exception
(a bug), its full traceback.
"""

import contextlib
import logging
import sys
from typing import Any, Iterator

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_job: str | None = None


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def job_name() -> str | None:
    """The running workflow job ('rule wildcard/values'), or None outside one."""
    return _job


def describe_job(snakemake: Any) -> str | None:
    """'train_image_classifier mammograms/baseline': the rule and its wildcard values."""
    rule = getattr(snakemake, "rule", None)
    if not rule:
        return None
    wildcards = getattr(snakemake, "wildcards", None)
    try:
        values = [str(value) for _, value in wildcards.items()] if wildcards else []
    except (AttributeError, TypeError):
        values = []
    return f"{rule} {'/'.join(values)}" if values else str(rule)


class _StripTrailingNewlines(logging.Filter):
    """`warnings.formatwarning` ends in a newline, which would leave a blank log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = record.msg.rstrip()
        return True


def configure_logging(log_file: str | None = None, level: int = logging.INFO,
                      job: str | None = None) -> None:
    """Log to stderr and, when Snakemake gives one, to the rule's log file.

    Warnings are routed through logging too (`logging.captureWarnings`), so they
    reach the log file. On stderr, where parallel jobs mix, each line names `job`.
    """
    console = logging.StreamHandler(sys.stderr)
    if job:
        console.setFormatter(logging.Formatter(_FORMAT.replace(
            "%(name)s", f"[{job.replace('%', '%%')}] %(name)s")))
    handlers: list[logging.Handler] = [console]
    if log_file:
        handlers.append(logging.FileHandler(log_file, mode="w", encoding="utf-8"))
    logging.basicConfig(level=level, format=_FORMAT, handlers=handlers, force=True)
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, _StripTrailingNewlines) for f in warnings_logger.filters):
        warnings_logger.addFilter(_StripTrailingNewlines())


def script_logging(snakemake) -> contextlib.AbstractContextManager[None]:
    """`job_logging` for a workflow script, with its rule's log file and job name."""
    return job_logging(snakemake.log[0] if snakemake.log else None, describe_job(snakemake))


@contextlib.contextmanager
def job_logging(log_file: str | None, job: str | None) -> Iterator[None]:
    """Set up logging for a workflow job and report errors where the log file holds them.

    A MedrobustError (bad input, bad config) is logged as one clear message and
    ends the job with exit code 1. Any other exception is a bug: its full
    traceback is logged (stderr and the log file) and the job ends with exit
    code 1.
    """
    from medrobust.errors import MedrobustError

    global _job
    _job = job
    configure_logging(log_file, job=job)
    log = logging.getLogger("medrobust")
    try:
        yield
    except MedrobustError as error:
        log.error("%s", error)
        sys.exit(1)
    except Exception as error:  # a bug: keep everything needed to find it
        log.critical("unexpected %s (a bug in medrobust or a library it uses); "
                     "traceback:", type(error).__name__, exc_info=True)
        sys.exit(1)
