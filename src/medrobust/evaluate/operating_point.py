"""A two-class model's operating point, chosen on its clean validation predictions.

The sensitivity at the clean operating point (docs/report.md) keeps one
threshold on P(positive class) under every condition, as a screening
programme keeps its recall threshold when image quality changes. The
threshold is chosen on the val split, which neither training's weights nor
the test metrics see, so that the test sensitivity at it is an honest
binomial proportion: chosen on the test images themselves it fitted their
scores and overstated the clean point. The evaluation job writes the record
(`conditions.OPERATING_POINT_FILE`), the summary applies it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from medrobust.errors import RERUN, InputError
from medrobust.evaluate.statistics import operating_threshold
from medrobust.io.result_files import read_result_record
from medrobust.logs import get_logger

log = get_logger(__name__)

OPERATING_POINT_KEYS = ("model", "chosen_on", "n", "n_positive", "positive_class", "threshold",
                        "reason")


def choose_operating_point(model: str, labels: np.ndarray, probabilities: np.ndarray,
                           classes: Sequence[str]) -> dict[str, Any]:
    """The record of the threshold with maximal Youden's J on these (val) predictions
    (`statistics.operating_threshold`); its threshold is None, and `reason` says why,
    with more than two classes or without both classes among the labels."""
    labels = np.asarray(labels, dtype=np.int64)
    n_positive = int((labels == 1).sum())
    threshold, reason = None, None
    if len(classes) != 2:
        reason = f"{len(classes)} classes: no single positive class"
    elif n_positive == 0 or n_positive == len(labels):
        reason = (f"the val split's {len(labels)} sample(s) hold "
                  f"{'no' if n_positive == 0 else 'only'} {classes[1]} cases; Youden's J "
                  "needs both classes")
    else:
        threshold = operating_threshold(labels, np.asarray(probabilities)[:, 1])
    return {"model": model, "chosen_on": "val", "n": int(len(labels)), "n_positive": n_positive,
            "positive_class": classes[1] if len(classes) == 2 else None,
            "threshold": threshold, "reason": reason}


def log_operating_point(record: dict[str, Any]) -> None:
    if record["threshold"] is None:
        log.warning("%s: no operating point (%s); the report leaves its sensitivity at the "
                    "clean operating point empty", record["model"], record["reason"])
    else:
        log.info("%s: operating point P(%s) >= %.4f, chosen on %d val samples (%d positive)",
                 record["model"], record["positive_class"], record["threshold"], record["n"],
                 record["n_positive"])


def read_operating_point(path: str | os.PathLike) -> dict[str, Any]:
    """An operating-point record, with a threshold that is None or a finite number."""
    record = read_result_record(path, "operating point", OPERATING_POINT_KEYS)
    threshold = record["threshold"]
    if threshold is not None and (isinstance(threshold, bool)
                                  or not isinstance(threshold, (int, float))
                                  or not np.isfinite(threshold)):
        raise InputError(f"{path}: the operating point's threshold must be a number or null, "
                         f"not {threshold!r}; {RERUN}")
    return record
