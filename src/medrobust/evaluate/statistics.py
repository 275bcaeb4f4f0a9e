"""Confidence intervals and paired tests for classifier metrics.

Test sets in medical imaging are small, so a metric without its uncertainty
invites reading noise as an effect. Counts (accuracy, sensitivity,
specificity) get exact binomial (Clopper-Pearson) intervals; a two-class (or
one-vs-rest) AUC gets Newcombe's score interval and balanced accuracy, a mean
of independent per-class recalls, the MOVER of their Wilson score intervals:
unlike a bootstrap, neither shrinks to a point when the test set happens to be
classified perfectly. A proportion of units that come in clusters (lesions
in images) gets Korn and Graubard's exact interval at the clustered
effective size. Macro averages over more classes, whose per-class terms
share samples, get a percentile bootstrap that resamples within each true
class, so every resample keeps the test set's class counts. Two models scored
on the same samples are compared pairwise: McNemar's exact test on the
discordant pairs, Newcombe's paired score interval of the accuracy difference
and, with two classes, the MOVER of the two AUCs' Newcombe intervals with
DeLong's correlation for the AUC difference (a paired bootstrap of macro AUCs
with more classes). Two models each right on a unit in a count of trials (the
perturbations an image survives) get the exact sign-flip test of the per-unit
differences and a paired t interval of their mean.

Samples that are not independent (images of one patient or lesion) are passed
as `clusters`, one key per sample. Where some cluster holds more than one
sample, accuracy gets Korn and Graubard's interval, a mean (and a paired
difference) the ratio estimator's Student t interval over the k clusters, and
the paired tests the exact sign-flip test of the per-cluster sums of the
per-sample differences: the cluster-level permutation test, which with one
sample per cluster is McNemar's (or the per-sample sign-flip) test again.
A two-class (or one-vs-rest) AUC gets Newcombe's interval at the effective
numbers of positives and negatives, m/deff and n/deff, where deff is Obuchowski's
clustered variance of the AUC (Biometrics 1997;53:567-578) over DeLong's per-sample one
(at most m and n; each cluster holding positives, or negatives, counted once where a
ranking leaves no variance to compare), shrunk for the k - 1 degrees of freedom as
Korn and Graubard's interval is; the AUC difference of two models the MOVER of two
such intervals with Obuchowski's correlation. Balanced accuracy, where no cluster
holds two classes (a lesion of one diagnosis), is the MOVER of the classes'
Korn-Graubard recalls, independent as they come from disjoint clusters. Clusters of
one sample each change nothing. The macro AUC and specificity of more than two
classes and the macro AUC difference get the cluster bootstrap: whole clusters drawn
with replacement, as many per class as it has (a cluster of several classes in a
stratum of its own). Balanced accuracy where a cluster holds two classes (a patient's normal
and abnormal images tie the recalls together) stays per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from medrobust.errors import InputError

CONFIDENCE = 0.95
N_RESAMPLES = 1000

EXACT = "exact binomial (Clopper-Pearson)"
NEWCOMBE = "Newcombe score interval (Mann-Whitney, method 5)"
CLUSTERED_NEWCOMBE = ("Newcombe score interval at the clustered effective sizes (Obuchowski "
                      "design effect, df-adjusted)")
WILSON_MOVER = "MOVER of Wilson score intervals (Zou & Donner 2008)"
CLUSTERED_MOVER = "MOVER of the classes' Korn-Graubard intervals (Zou & Donner 2008)"
NEWCOMBE_PAIRED = "Newcombe paired score interval (1998, method 10)"
AUC_MOVER = "MOVER of Newcombe AUC intervals, DeLong correlation"
CLUSTERED_AUC_MOVER = "MOVER of clustered Newcombe AUC intervals, Obuchowski correlation"
KORN_GRAUBARD = "Korn-Graubard (exact binomial at the clustered effective size, df-adjusted)"
STRATIFIED = "stratified bootstrap (percentile)"
CLUSTER_BOOTSTRAP = "cluster bootstrap (percentile), clusters drawn within their classes"
STUDENT_T = "Student t"
CLUSTERED_T = "Student t over clusters (ratio estimator, linearised variance, k - 1 df)"
MCNEMAR = "McNemar exact"
SIGN_FLIP = "exact sign-flip test"
CLUSTERED_SIGN_FLIP = "exact sign-flip test of per-group sums"
PAIRED = "paired bootstrap (percentile)"
PAIRED_CLUSTERS = "paired cluster bootstrap (percentile), clusters drawn within their classes"

# resample index matrices are built this many entries at a time, bounding memory for large n
_CHUNK_ENTRIES = 2_000_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval and how the interval was made.

    All three numbers are None where the statistic is undefined (an AUC with a
    single class present, a proportion of zero trials).
    """

    estimate: float | None
    low: float | None
    high: float | None
    method: str

    def as_dict(self) -> dict:
        """The interval as a JSON-ready dict."""
        return {"estimate": self.estimate, "low": self.low, "high": self.high,
                "method": self.method}


def jsonable(value: Any) -> Any:
    """`value` with every Interval inside dicts and lists replaced by its dict."""
    if isinstance(value, Interval):
        return value.as_dict()
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return value


# ---------------------------------------------------------------- input checks

def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise InputError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def _check_resamples(n_resamples: int) -> None:
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise InputError(f"n_resamples must be a positive integer, got {n_resamples}")


def _integer_labels(labels: Any, name: str = "labels") -> np.ndarray:
    """`labels` as a 1-D int64 array; non-integral values are an error."""
    array = np.asarray(labels)
    if array.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {array.shape}")
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64, copy=False)
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{name} must be integers, got dtype {array.dtype}")
    if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
        raise InputError(f"{name} must be integers")
    return array.astype(np.int64)


def _check_probabilities(probabilities: Any, n: int, n_classes: int | None = None,
                         name: str = "probabilities") -> np.ndarray:
    """`probabilities` as a finite float64 `(n, k)` array, k >= 2 (and == n_classes if given)."""
    array = np.asarray(probabilities, dtype=np.float64)
    if array.ndim != 2:
        raise InputError(f"{name} must be 2-D (samples, classes), got shape {array.shape}")
    if array.shape[0] != n:
        raise InputError(f"{name} has {array.shape[0]} rows but there are {n} labels")
    if n_classes is not None and array.shape[1] != n_classes:
        raise InputError(f"{name} has {array.shape[1]} columns but there are "
                         f"{n_classes} classes")
    if array.shape[1] < 2:
        raise InputError(f"{name} needs at least 2 class columns, got {array.shape[1]}")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} contains NaN or infinite values")
    return array


def _check_label_range(labels: np.ndarray, n_classes: int) -> None:
    outside = (labels < 0) | (labels >= n_classes)
    if outside.any():
        raise InputError(f"labels must lie in 0..{n_classes - 1} for {n_classes} classes; "
                         f"found {sorted(set(labels[outside].tolist()))[:5]}")


def _boolean_vector(values: Any, name: str) -> np.ndarray:
    """A 1-D array of 0/1 (or bool) values as bool."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {array.shape}")
    if array.dtype != bool and not ((array == 0) | (array == 1)).all():
        raise InputError(f"{name} must hold only True/False (or 0/1)")
    return array.astype(bool)


def _clusters_of(clusters: Any, n: int) -> np.ndarray:
    """`clusters` as an array with one key per sample; a None key is a cluster of its own
    (as an empty cell of the manifest's group column)."""
    clusters = np.asarray(clusters)
    if clusters.shape != (n,):
        raise InputError(f"need one cluster per sample, got shape {clusters.shape} for {n} "
                         "samples")
    if clusters.dtype == object:   # prefixed: a group named like a position stays apart
        clusters = np.array([f"alone:{index}" if key is None else f"group:{key}"
                             for index, key in enumerate(clusters)], dtype=object)
    return clusters


class Clustering(NamedTuple):
    """Each sample's cluster number (0..k-1) and the number of clusters k."""

    member_of: np.ndarray
    k: int


def cluster_numbers(clusters: Any, n: int) -> Clustering:
    """Each of the n samples' cluster number (0..k-1) and the number of clusters k. A
    `Clustering` (`cluster_index`'s) is passed on as it is, so that a caller numbers its
    samples' clusters once and hands the numbers to every statistic it computes."""
    if isinstance(clusters, Clustering):
        if len(clusters.member_of) != n:
            raise InputError(f"need one cluster per sample, got {len(clusters.member_of)} "
                             f"for {n} samples")
        return clusters
    _, member_of = np.unique(_clusters_of(clusters, n), return_inverse=True)
    return Clustering(member_of.reshape(-1), int(member_of.max()) + 1 if n else 0)


def _within(clustering: Clustering | None, selected: np.ndarray) -> Clustering | None:
    """`cluster_index` of the samples `selected` (a mask), from all the samples' `clustering`:
    their clusters numbered afresh, in the same order."""
    if clustering is None:
        return None
    return cluster_index(clustering.member_of[selected], int(np.sum(selected)))


def _clusters_within_classes(labels: np.ndarray, clustering: Clustering | None) -> bool:
    """Whether a `clustering` (`cluster_index`) puts some samples together and no cluster holds
    two classes' samples (a lesion of one diagnosis, not a patient with a normal and an
    abnormal image): then the classes' recalls come from disjoint clusters."""
    if clustering is None:
        return False
    member_of, k = clustering
    lowest, highest = np.full(k, labels.max()), np.full(k, labels.min())
    np.minimum.at(lowest, member_of, labels)
    np.maximum.at(highest, member_of, labels)
    return bool((lowest == highest).all())


def cluster_index(clusters: Any, n: int) -> Clustering | None:
    """`cluster_numbers`, or None where there is nothing to account for: no `clusters`, or
    every sample a cluster of its own (the per-sample methods are then the right ones, and
    stay exactly as they were)."""
    if clusters is None:
        return None
    clustering = cluster_numbers(clusters, n)
    return None if clustering.k == n else clustering


# ---------------------------------------------------------------- exact binomial

def clopper_pearson(successes: int, trials: int, confidence: float = CONFIDENCE) -> Interval:
    """The proportion successes/trials with its exact (Clopper-Pearson) interval.

    Exact rather than normal-approximation because test sets are small and
    proportions often sit at 0 or 1, where the approximation collapses.
    Zero trials give an all-None interval.
    """
    _check_confidence(confidence)
    if int(successes) != successes or int(trials) != trials:
        raise InputError(f"successes and trials must be integers, got {successes}, {trials}")
    successes, trials = int(successes), int(trials)
    if trials < 0 or not 0 <= successes <= trials:
        raise InputError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return Interval(None, None, None, EXACT)
    tail = (1.0 - confidence) / 2.0
    from scipy.stats import beta  # here, not at the top: evaluation jobs never need scipy

    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(
        beta.ppf(1.0 - tail, successes + 1, trials - successes))
    return Interval(successes / trials, low, high, EXACT)


def clustered_proportion(successes: np.ndarray, clusters: np.ndarray,
                         confidence: float = CONFIDENCE) -> Interval:
    """The proportion of successes among units that come in clusters (lesions in images),
    with Korn and Graubard's interval (Survey Methodology 1998;24:193-201).

    Units of one cluster are not independent: eleven images of about eight
    calcifications each are not 83 draws. The ratio estimate p = Σy/Σm gets
    its between-cluster (linearised) variance v = k/(k-1) Σ(y_j - p m_j)²/(Σm)²
    over k clusters; the exact binomial interval is then taken at the
    effective size n* = p(1-p)/v (at most n: a design effect below 1 is not
    credited; n where v is 0, as at p = 0 or 1), shrunk by (t_{n-1}/t_{k-1})²
    for the k - 1 degrees of freedom, as R's `survey::svyciprop(method =
    "beta")` does. One cluster says nothing of the variation between
    clusters: its interval is [0, 1].
    """
    _check_confidence(confidence)
    successes = _boolean_vector(successes, "successes")
    n = len(successes)
    member_of, k = cluster_numbers(clusters, n)
    if n == 0:
        return Interval(None, None, None, KORN_GRAUBARD)
    sizes = np.bincount(member_of)
    hits = np.bincount(member_of, weights=successes)
    p = float(successes.mean())
    if k < 2:
        return Interval(p, 0.0, 1.0, KORN_GRAUBARD)
    variance = k / (k - 1) * float(((hits - p * sizes) ** 2).sum()) / n ** 2
    effective = n if variance == 0 else min(float(n), p * (1 - p) / variance)
    tail = (1.0 - confidence) / 2.0
    from scipy.stats import beta, t  # as in clopper_pearson

    effective *= (t.ppf(tail, n - 1) / t.ppf(tail, k - 1)) ** 2
    x = p * effective
    low = 0.0 if p == 0 else float(beta.ppf(tail, x, effective - x + 1))
    high = 1.0 if p == 1 else float(beta.ppf(1.0 - tail, x + 1, effective - x))
    return Interval(p, low, high, KORN_GRAUBARD)


def newcombe_auc(auc: float | None, n_positive: float, n_negative: float,
                 confidence: float = CONFIDENCE) -> Interval:
    """An AUC with Newcombe's score-type interval (Stat Med 2006;25:559-573, method 5).

    The interval is every θ with (AUC - θ)² <= z² V(θ), where
    V(θ) = θ(1-θ)[1 + N*(1-θ)/(2-θ) + N*θ/(1+θ)] / (m n), N* = (m + n)/2 - 1,
    for m positives and n negatives. V is taken at θ, not at the estimate, so an
    AUC of 1 on 8 against 8 samples gets [0.76, 1], where a bootstrap (every
    resample ranked perfectly too) or DeLong's variance gives [1, 1]. The sizes may
    be fractional: the effective sizes of samples in clusters (`_clustered_newcombe`).
    """
    _check_confidence(confidence)
    if auc is None or n_positive <= 0 or n_negative <= 0:
        return Interval(None, None, None, NEWCOMBE)
    from scipy.optimize import brentq  # here, as in clopper_pearson

    z = _z(confidence)
    pairs, others = n_positive * n_negative, (n_positive + n_negative) / 2 - 1

    def excess(theta: float) -> float:
        """(AUC - θ)² - z² V(θ): <= 0 inside the interval."""
        variance = theta * (1 - theta) * (1 + others * (1 - theta) / (2 - theta)
                                          + others * theta / (1 + theta)) / pairs
        return (auc - theta) ** 2 - z * z * variance

    # excess is >= 0 at 0 and at 1 and < 0 just inside from an estimate at a bound
    edge = 1e-12
    low = 0.0 if auc <= edge else brentq(excess, 0.0, min(auc, 1 - edge), xtol=1e-10)
    high = 1.0 if auc >= 1 - edge else brentq(excess, max(auc, edge), 1.0, xtol=1e-10)
    return Interval(float(auc), float(low), float(high), NEWCOMBE)


def _z(confidence: float) -> float:
    from scipy.stats import norm  # here, as in clopper_pearson

    return float(norm.ppf(0.5 + confidence / 2))


def _wilson(successes: int, trials: int, z: float) -> tuple[float, float, float]:
    """The proportion and its Wilson score interval (trials >= 1)."""
    p = successes / trials
    shrink = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / shrink
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / shrink
    # exact at the bounds, where rounding would leave 1 - 1e-16
    return (p, 0.0 if successes == 0 else centre - half,
            1.0 if successes == trials else centre + half)


def mover_wilson(successes: list[int], trials: list[int], weights: list[float],
                 confidence: float = CONFIDENCE) -> Interval:
    """Σ wᵢ pᵢ of independent proportions pᵢ = successesᵢ / trialsᵢ with the MOVER interval
    of their Wilson intervals (Zou & Donner, Stat Med 2008;27:1693-1702): each side is the
    root sum of squares of the distances from each pᵢ to the Wilson limit on that side
    (the upper one where wᵢ < 0). Weights 1 and -1 give Newcombe's interval of a difference
    (Stat Med 1998;17:873-890, method 10); weights 1/K, balanced accuracy over K classes.
    """
    _check_confidence(confidence)
    if not len(successes) == len(trials) == len(weights) or not len(trials):
        raise InputError(f"need as many successes, trials and weights, at least one; got "
                         f"{len(successes)}, {len(trials)} and {len(weights)}")
    if not all(math.isfinite(weight) for weight in weights):
        raise InputError(f"weights must be finite numbers, got {list(weights)}")
    z = _z(confidence)
    for count, total in zip(successes, trials):
        if int(total) != total or int(count) != count or not 0 <= count <= total or total < 1:
            raise InputError(f"need integers 0 <= successes <= trials, trials >= 1; got "
                             f"{count} of {total}")
    return _mover([_wilson(int(count), int(total), z) for count, total in zip(successes, trials)],
                  weights, WILSON_MOVER)


def _mover(intervals: list[tuple[float, float, float]], weights: list[float],
           method: str) -> Interval:
    """Σ wᵢ pᵢ of independent estimates, each given as (pᵢ, low, high), with the MOVER
    interval: each side the root sum of squares of the distances from each pᵢ to its limit
    on that side (the other side's where wᵢ < 0)."""
    estimate, below, above = 0.0, 0.0, 0.0
    for (p, low, high), weight in zip(intervals, weights, strict=True):
        down, up = (p - low, high - p) if weight >= 0 else (high - p, p - low)
        estimate += weight * p
        below += (weight * down) ** 2
        above += (weight * up) ** 2
    # inside the bounds of Σ wᵢ pᵢ over pᵢ in [0, 1] by construction: each side's root sum of
    # squares is at most the plain sum of the distances to the limits
    return Interval(float(estimate), float(estimate - math.sqrt(below)),
                    float(estimate + math.sqrt(above)), method)


def _correlated_difference(b: tuple[float, float, float], a: tuple[float, float, float],
                           correlation: float, method: str) -> Interval:
    """b - a from each one's (estimate, low, high), by the MOVER for correlated estimates
    (Zou & Donner 2008; Newcombe 1998's method 10 for proportions): each side is the root
    of the sum of squares of the distances to the limits on that side, less twice their
    product times the correlation. |correlation| <= 1 keeps both sides >= 0 (rounding
    aside) and inside [low_b - high_a, high_b - low_a]."""
    (p_b, low_b, high_b), (p_a, low_a, high_a) = b, a
    below = (p_b - low_b) ** 2 + (high_a - p_a) ** 2 \
        - 2 * correlation * (p_b - low_b) * (high_a - p_a)
    above = (high_b - p_b) ** 2 + (p_a - low_a) ** 2 \
        - 2 * correlation * (high_b - p_b) * (p_a - low_a)
    estimate = p_b - p_a
    return Interval(estimate, estimate - math.sqrt(max(0.0, below)),
                    estimate + math.sqrt(max(0.0, above)), method)


def newcombe_paired_difference(only_a: int, only_b: int, both: int, neither: int,
                               confidence: float = CONFIDENCE) -> Interval:
    """Accuracy of b minus accuracy of a on the same samples, with Newcombe's interval for
    paired proportions (Stat Med 1998;17:2635-2650, method 10): the two accuracies' Wilson
    intervals, combined as `mover_wilson` combines a difference, less their covariance
    through φ, the correlation of the two models' correctness, whose numerator
    both·neither - only_a·only_b is moved N/2 towards 0 when positive (Newcombe's
    correction). Arguments count samples that only a, only b, both or neither get right.
    """
    _check_confidence(confidence)
    counts = (only_a, only_b, both, neither)
    if any(int(count) != count or count < 0 for count in counts) or sum(counts) < 1:
        raise InputError(f"need counts >= 0 of at least one pair, got {counts}")
    only_a, only_b, both, neither = (int(count) for count in counts)
    n = only_a + only_b + both + neither
    z = _z(confidence)
    margins = (both + only_b) * (only_a + neither) * (both + only_a) * (only_b + neither)
    cross = both * neither - only_a * only_b  # 0 wherever a margin is
    if 0 <= cross <= n / 2:
        phi = 0.0
    else:
        phi = (cross - n / 2 if cross > 0 else cross) / math.sqrt(margins)
    return _correlated_difference(_wilson(both + only_b, n, z), _wilson(both + only_a, n, z),
                                  phi, NEWCOMBE_PAIRED)


# ---------------------------------------------------------------- AUC

def _value_ids(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """Each score's rank among the distinct scores, and how many distinct scores there are."""
    distinct, ids = np.unique(scores, return_inverse=True)
    return ids.reshape(-1), len(distinct)


def _batched_auc(positive: np.ndarray, value_ids: np.ndarray, n_values: int,
                 weights: np.ndarray) -> np.ndarray:
    """AUC of each resample (row of `weights`: how many times it holds each sample), ties
    counted half; NaN where a resample has no positives or no negatives.

    Counting each resample's positives and negatives per distinct score (one
    weighted bincount, no sorting) gives the Mann-Whitney statistic in O(n)
    per resample, exactly: the weights are whole numbers.
    """
    rows = weights.shape[0]
    n_pos, n_neg = weights @ positive, weights @ ~positive
    # one key per (row, distinct score, positive?) so a single bincount counts everything
    keys = (2 * value_ids + positive)[None, :] + (np.arange(rows) * 2 * n_values)[:, None]
    counts = np.bincount(keys.ravel(), weights=weights.ravel(),
                         minlength=rows * 2 * n_values).reshape(rows, n_values, 2)
    negatives, positives = counts[..., 0], counts[..., 1]
    negatives_below = np.cumsum(negatives, axis=1) - negatives
    # twice the wins (a tie is half a win) is a whole number, so the ratio is exact
    twice_wins = (positives * (2 * negatives_below + negatives)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), twice_wins / (2 * n_pos * n_neg), np.nan)


def auc_score(labels01: np.ndarray, scores: np.ndarray) -> float | None:
    """Binary ROC AUC of `scores` for labels 0/1 (ties count half); None if one class only.

    Equal to sklearn.metrics.roc_auc_score, computed as the Mann-Whitney U so
    that the bootstrap can share the same code.
    """
    labels = _integer_labels(labels01, "labels01")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) != len(labels):
        raise InputError(f"scores must be 1-D with one score per label; got shape "
                         f"{scores.shape} for {len(labels)} labels")
    if not ((labels == 0) | (labels == 1)).all():
        raise InputError("labels01 must hold only 0 and 1")
    if not np.all(np.isfinite(scores)):
        raise InputError("scores contain NaN or infinite values")
    positive = labels == 1
    if positive.all() or not positive.any():
        return None
    ids, n_values = _value_ids(scores)
    return float(_batched_auc(positive, ids, n_values, np.ones((1, len(labels))))[0])


def _placements(positive_scores: np.ndarray, negative_scores: np.ndarray,
                ) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components: each positive's share of negatives scored below it,
    each negative's share of positives scored above it (ties half), from midranks."""
    m, n = len(positive_scores), len(negative_scores)
    from scipy.stats import rankdata  # here, as in clopper_pearson

    ranks = rankdata(np.concatenate([positive_scores, negative_scores]))
    return ((ranks[:m] - rankdata(positive_scores)) / n,
            1 - (ranks[m:] - rankdata(negative_scores)) / m)


def _delong_covariance(first: tuple[np.ndarray, np.ndarray],
                       second: tuple[np.ndarray, np.ndarray]) -> float:
    """DeLong's covariance of two AUCs on the same samples from their `_placements`."""
    covariance = 0.0
    for a, b in zip(first, second):
        if len(a) > 1:
            covariance += float(np.cov(a, b)[0, 1]) / len(a)
    return covariance


def _cluster_sums(values: tuple[np.ndarray, np.ndarray], positive: np.ndarray,
                  clustering: Clustering) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster (`cluster_index`), the sum of `values` over its positives and over its
    negatives; `values` holds one number per positive and one per negative in the samples'
    order, as `_placements` does. Of the placements: Obuchowski's V10_i and V01_i; of ones:
    the clusters' numbers of positives and negatives, m_i and n_i."""
    member_of, k = clustering
    return (np.bincount(member_of[positive], weights=values[0], minlength=k),
            np.bincount(member_of[~positive], weights=values[1], minlength=k))


def _obuchowski_covariance(first: tuple[np.ndarray, np.ndarray],
                           second: tuple[np.ndarray, np.ndarray],
                           sizes: tuple[np.ndarray, np.ndarray]) -> float | None:
    """Obuchowski's covariance of two AUCs on the same samples in clusters (Biometrics
    1997;53:567-578), from their `_cluster_sums` of `_placements` and the clusters' numbers
    of positives and negatives (`sizes`, m_i and n_i, M and N in all).

    With d_i = V10_i - m_i θ and e_i = V01_i - n_i θ (θ the AUC), the variance is
    S10/M + S01/N + 2 S11/(M N), S10 = I10/((I10 - 1) M) Σ d_i² over the I10 clusters that
    hold positives, S01 = I01/((I01 - 1) N) Σ e_i² over the I01 that hold negatives,
    S11 = I/(I - 1) Σ d_i e_i over all I; the covariance takes each product across the
    two models (S11 both ways round). With one sample per cluster S11 = 0 and this is
    DeLong's (`_delong_covariance`). None where fewer than two clusters hold positives,
    or negatives: the variation between them is then unknown.
    """
    holding = [int((size > 0).sum()) for size in sizes]
    if min(holding) < 2:
        return None

    def residuals(sums: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
        return [total - size * (total.sum() / size.sum()) for total, size in zip(sums, sizes)]

    (d_1, e_1), (d_2, e_2) = residuals(first), residuals(second)
    total_m, total_n, k = float(sizes[0].sum()), float(sizes[1].sum()), len(sizes[0])
    return float(holding[0] / (holding[0] - 1) * (d_1 @ d_2) / total_m ** 2
                 + holding[1] / (holding[1] - 1) * (e_1 @ e_2) / total_n ** 2
                 + k / (k - 1) * (d_1 @ e_2 + d_2 @ e_1) / (total_m * total_n))


def _clustered_newcombe(auc: float, placements: tuple[np.ndarray, np.ndarray],
                        variance: float | None, sizes: tuple[np.ndarray, np.ndarray],
                        confidence: float) -> Interval:
    """Newcombe's interval (`newcombe_auc`) of an AUC of samples in k clusters, at the
    effective numbers of positives and negatives m/deff and n/deff, as Korn and Graubard
    take the exact binomial at a clustered effective size (`clustered_proportion`).

    deff is Obuchowski's clustered `variance` over DeLong's per-sample one (from the
    `placements`); the sizes are at most m and n (a design effect below 1 is not
    credited) and both are multiplied by (t_{m+n-1} / t_{k-1})² for the k - 1 degrees of
    freedom, as in `clustered_proportion`. Where there is no design effect to take
    (DeLong's variance 0: a perfect ranking, or all scores tied; or fewer than two
    clusters holding positives, or negatives) each cluster holding positives, and each
    holding negatives, counts once, min(m, I10) and min(n, I01): the sizes of the
    clusters' images were they copies of one, the least they can hold. One cluster:
    [0, 1], as `clustered_proportion` gives.
    """
    m, n, k = len(placements[0]), len(placements[1]), len(sizes[0])
    if k < 2:
        return Interval(auc, 0.0, 1.0, CLUSTERED_NEWCOMBE)
    per_sample = _delong_covariance(placements, placements)
    if variance is None or per_sample <= 0:
        effective = [min(total, int((size > 0).sum())) for total, size in zip((m, n), sizes)]
    else:
        design_effect = variance / per_sample
        effective = [total / max(design_effect, 1.0) for total in (m, n)]
    tail = (1.0 - confidence) / 2.0
    from scipy.stats import t  # as in clopper_pearson

    shrink = (t.ppf(tail, m + n - 1) / t.ppf(tail, k - 1)) ** 2
    interval = newcombe_auc(auc, effective[0] * shrink, effective[1] * shrink, confidence)
    return Interval(interval.estimate, interval.low, interval.high, CLUSTERED_NEWCOMBE)


def auc_interval(labels01: np.ndarray, scores: np.ndarray, confidence: float = CONFIDENCE,
                 clusters: Any = None) -> Interval:
    """The AUC of `scores` for labels 0/1 (`auc_score`) with Newcombe's interval
    (`newcombe_auc`); with `clusters` (`cluster_index`: more than one sample in some
    cluster) at the clustered effective sizes (`_clustered_newcombe`). None where a class
    is missing."""
    auc = auc_score(labels01, scores)  # checks labels and scores
    positive = _integer_labels(labels01, "labels01") == 1
    clustering = cluster_index(clusters, len(positive))
    if clustering is None:
        return newcombe_auc(auc, int(positive.sum()), int((~positive).sum()), confidence)
    if auc is None:
        return Interval(None, None, None, CLUSTERED_NEWCOMBE)
    scores = np.asarray(scores, dtype=np.float64)
    placements = _placements(scores[positive], scores[~positive])
    sizes = _cluster_sums((np.ones(len(placements[0])), np.ones(len(placements[1]))),
                          positive, clustering)
    sums = _cluster_sums(placements, positive, clustering)
    return _clustered_newcombe(auc, placements, _obuchowski_covariance(sums, sums, sizes),
                               sizes, confidence)


def paired_auc_difference(labels01: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                          confidence: float = CONFIDENCE, clusters: Any = None) -> Interval:
    """AUC of b minus AUC of a on the same samples: the MOVER (Zou & Donner 2008) of the two
    AUCs' Newcombe intervals (`newcombe_auc`), less their covariance through r, the
    correlation of the two AUC estimates by DeLong's method (Biometrics 1988;44:837-845),
    as `newcombe_paired_difference` does for accuracies; r is 0 where either variance is
    (a perfect ranking), so two perfect rankers of 8 against 8 samples read 0 ± 0.24, where
    every paired resample, and DeLong's own variance, says 0 exactly. None where a class
    is missing.

    With `clusters` (`cluster_index`) each AUC's interval is the clustered one
    (`_clustered_newcombe`) and r comes from Obuchowski's covariance and variances
    (`_obuchowski_covariance`; 0 where either is 0 or unknown; each cluster's two-model
    form is positive semidefinite, so |r| <= 1, and the cut to [-1, 1] only guards the
    last bit).
    """
    _check_confidence(confidence)
    labels = _integer_labels(labels01, "labels01")
    a, b = _check_paired_scores(labels, scores_a, scores_b)
    if a.ndim != 1:
        raise InputError(f"scores must be 1-D, one per label; got shape {a.shape}")
    auc_a, auc_b = auc_score(labels, a), auc_score(labels, b)  # checks labels and values
    clustering = cluster_index(clusters, len(labels))
    method = AUC_MOVER if clustering is None else CLUSTERED_AUC_MOVER
    if auc_a is None:
        return Interval(None, None, None, method)
    positive = labels == 1
    m, n = int(positive.sum()), int((~positive).sum())
    placements = [_placements(scores[positive], scores[~positive]) for scores in (a, b)]
    if clustering is None:
        def covariance(i: int, j: int) -> float | None:
            return _delong_covariance(placements[i], placements[j])

        def interval(i: int, auc: float) -> Interval:
            return newcombe_auc(auc, m, n, confidence)
    else:
        sizes = _cluster_sums((np.ones(m), np.ones(n)), positive, clustering)
        sums = [_cluster_sums(values, positive, clustering) for values in placements]

        def covariance(i: int, j: int) -> float | None:
            return _obuchowski_covariance(sums[i], sums[j], sizes)

        def interval(i: int, auc: float) -> Interval:
            return _clustered_newcombe(auc, placements[i], covariance(i, i), sizes, confidence)
    variance_a, variance_b = covariance(0, 0), covariance(1, 1)
    r = (covariance(0, 1) / math.sqrt(variance_a * variance_b)
         if variance_a is not None and variance_b is not None
         and variance_a > 0 and variance_b > 0 else 0.0)
    if clustering is not None:
        r = min(1.0, max(-1.0, r))
    interval_a, interval_b = interval(0, auc_a), interval(1, auc_b)
    return _correlated_difference((auc_b, interval_b.low, interval_b.high),
                                  (auc_a, interval_a.low, interval_a.high), r, method)


# ---------------------------------------------------------------- bootstrap machinery

def _stratified_resamples(strata: np.ndarray, n_resamples: int, seed: int,
                          ) -> Iterator[np.ndarray]:
    """Blocks of resample index rows, each row drawn with replacement within each stratum.

    Row r, position i holds a sample of the same stratum as sample i, so every
    resample keeps the stratum counts, and labels taken through the indices
    equal the original labels. Blocks bound memory; the random stream depends
    only on the seed, the strata and the block size (which depends only on n).
    """
    rng = np.random.default_rng(seed)
    n = len(strata)
    groups = [np.flatnonzero(strata == value) for value in np.unique(strata)]
    block = max(1, _CHUNK_ENTRIES // max(n, 1))
    for start in range(0, n_resamples, block):
        rows = min(block, n_resamples - start)
        index = np.empty((rows, n), dtype=np.intp)
        for members in groups:
            index[:, members] = members[rng.integers(0, len(members), size=(rows, len(members)))]
        yield index


def _resample_weights(strata: np.ndarray, n_resamples: int, seed: int,
                      clusters: Clustering | None = None) -> Iterator[np.ndarray]:
    """Blocks of resamples as weights `(rows, n)`: how many times each resample holds each
    sample. Without `clusters`, `_stratified_resamples`' draws. With them (`cluster_index`)
    the clusters are drawn with replacement, as many per stratum as it holds, a cluster's
    stratum being the set of its samples' strata (its class; a patient with images of
    two classes, that pair), and its samples weighted by how often it was drawn: the
    cluster bootstrap. Its resamples keep each stratum's number of clusters, not of
    samples, and so hold every class the test set has."""
    n = len(strata)
    if clusters is None:
        for index in _stratified_resamples(strata, n_resamples, seed):
            rows = len(index)
            flat = (index + (np.arange(rows) * n)[:, None]).ravel()
            yield np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)
        return
    member_of, k = clusters
    held: list[set] = [set() for _ in range(k)]
    for cluster, stratum in zip(member_of.tolist(), np.asarray(strata).tolist()):
        held[cluster].add(stratum)
    kinds: dict[tuple, list[int]] = {}
    for cluster, found in enumerate(held):
        kinds.setdefault(tuple(sorted(found)), []).append(cluster)
    groups = [np.array(members) for _, members in sorted(kinds.items())]
    rng = np.random.default_rng(seed)
    block = max(1, _CHUNK_ENTRIES // max(n, 1))
    for start in range(0, n_resamples, block):
        rows = min(block, n_resamples - start)
        drawn = np.zeros((rows, k))
        for members in groups:
            picks = members[rng.integers(0, len(members), size=(rows, len(members)))]
            np.add.at(drawn, (np.arange(rows)[:, None], picks), 1.0)
        yield drawn[:, member_of]


def _percentile_interval(estimate: float, samples: np.ndarray, confidence: float,
                         method: str) -> Interval:
    """Percentile interval of the finite bootstrap samples around `estimate` (None if NaN)."""
    samples = samples[np.isfinite(samples)]
    if not np.isfinite(estimate) or len(samples) == 0:
        return Interval(None, None, None, method)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return Interval(float(estimate), float(low), float(high), method)


def _bootstrap(statistics: Callable[[np.ndarray], dict[str, np.ndarray]], strata: np.ndarray,
               n_resamples: int, seed: int, confidence: float, method: str,
               clusters: Clustering | None = None) -> dict[str, Interval]:
    """Intervals for several statistics computed on one shared set of resamples.

    `statistics(weights)` maps an `(r, n)` block of resample weights
    (`_resample_weights`; stratified, or by `clusters`) to per-row values by
    name; weights of one give the estimates.
    """
    estimates = statistics(np.ones((1, len(strata))))
    blocks = [statistics(weights)
              for weights in _resample_weights(strata, n_resamples, seed, clusters)]
    return {name: _percentile_interval(float(estimates[name][0]),
                                       np.concatenate([block[name] for block in blocks]),
                                       confidence, method)
            for name in estimates}


def _mean_over_classes(columns: list[np.ndarray], rows: int) -> np.ndarray:
    """Row-wise mean of per-class columns, NaN where there are none."""
    if not columns:
        return np.full(rows, np.nan)
    return np.mean(np.stack(columns, axis=1), axis=1)


class _Scorer:
    """Per-resample metrics of one model's probabilities, each resample a row of weights
    (`_resample_weights`) over its samples."""

    def __init__(self, labels: np.ndarray, probabilities: np.ndarray):
        self.labels = labels
        self.n_classes = probabilities.shape[1]
        self.predictions = probabilities.argmax(axis=1)
        self.present = [c for c in range(self.n_classes) if (labels == c).any()]
        self.value_ids = [_value_ids(probabilities[:, c]) for c in range(self.n_classes)]

    def class_auc(self, c: int, weights: np.ndarray) -> np.ndarray:
        """One-vs-rest AUC of class c with score P(c), per resample (row of `weights`)."""
        ids, n_values = self.value_ids[c]
        return _batched_auc(self.labels == c, ids, n_values, weights)

    def auc(self, weights: np.ndarray) -> np.ndarray:
        """Binary: AUC of P(class 1); more classes: macro one-vs-rest over classes present."""
        if self.n_classes == 2:
            return self.class_auc(1, weights)
        if len(self.present) < 2:
            return np.full(weights.shape[0], np.nan)
        return _mean_over_classes([self.class_auc(c, weights) for c in self.present],
                                  weights.shape[0])

    def specificities(self, weights: np.ndarray) -> list[np.ndarray]:
        """Per-class one-vs-rest specificity of each resample (classes present with negatives);
        NaN in a resample that holds none of a class's negatives."""
        rates = []
        for c in self.present:
            others = self.labels != c
            if others.any():
                with np.errstate(invalid="ignore", divide="ignore"):
                    rates.append((weights @ (others & (self.predictions != c)))
                                 / (weights @ others))
        return rates


# ---------------------------------------------------------------- one model

def model_auc(labels: np.ndarray, probabilities: np.ndarray) -> float | None:
    """The AUC the intervals are built around, without them: binary, the AUC of P(class 1);
    more classes, the macro one-vs-rest AUC over the classes present. None where undefined."""
    labels = _integer_labels(labels)
    probabilities = _check_probabilities(probabilities, len(labels))
    _check_label_range(labels, probabilities.shape[1])
    value = _Scorer(labels, probabilities).auc(np.ones((1, len(labels))))[0]
    return None if np.isnan(value) else float(value)


def classification_statistics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str],
                              n_resamples: int = N_RESAMPLES, seed: int = 0,
                              confidence: float = CONFIDENCE, clusters: Any = None) -> dict:
    """Accuracy, balanced accuracy, AUC, sensitivity and specificity with intervals.

    The prediction is the argmax class. Accuracy and binary sensitivity
    (positive class = classes[1]) and specificity are exact binomial; the binary
    and per-class (one-vs-rest) AUCs have Newcombe's score interval; balanced
    accuracy (and, k > 2, the macro sensitivity, the same number) has the MOVER
    of the per-class recalls' Wilson intervals; with k > 2 the macro AUC and
    specificity come from one shared stratified bootstrap. Macro averages run over
    the classes present in the labels; per-class statistics of a class with no
    samples are None. With `clusters` (the samples' patients or lesions) accuracy
    and the per-class sensitivities and specificities get Korn and Graubard's
    interval over them (`proportion_interval`), the binary and per-class AUCs
    Newcombe's at the clustered effective sizes (`auc_interval`), and balanced
    accuracy (with k > 2 the macro sensitivity), where no cluster holds two
    classes, the MOVER of the classes' recalls' intervals (`proportion_interval`:
    Korn-Graubard, exact for a class whose samples are all apart). Balanced
    accuracy where a cluster holds two classes (its recalls are then not
    independent) stays per sample, with Wilson intervals. With k > 2 the macro AUC
    and specificity's bootstrap draws whole clusters (`_resample_weights`).
    """
    labels = _integer_labels(labels)
    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise InputError(f"class names must be distinct, got {classes}")
    probabilities = _check_probabilities(probabilities, len(labels), len(classes))
    _check_label_range(labels, len(classes))
    _check_resamples(n_resamples)
    _check_confidence(confidence)

    k = len(classes)
    scorer = _Scorer(labels, probabilities)
    predictions = scorer.predictions

    def statistics(weights: np.ndarray) -> dict[str, np.ndarray]:
        return {"auc": scorer.auc(weights),
                "specificity": _mean_over_classes(scorer.specificities(weights),
                                                  weights.shape[0])}

    # two classes need no resamples: every interval has a closed form
    clustering = cluster_index(clusters, len(labels))
    boot = _bootstrap(statistics, labels, n_resamples, seed, confidence,
                      STRATIFIED if clustering is None else CLUSTER_BOOTSTRAP, clustering) \
        if k > 2 else {}

    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    n = len(labels)
    per_class = {}
    for c, name in enumerate(classes):
        members, others = labels == c, labels != c
        per_class[name] = {
            "support": int(support[c]),
            "sensitivity": proportion_interval(predictions[members] == c, confidence,
                                               _within(clustering, members)),
            "specificity": proportion_interval(predictions[others] != c, confidence,
                                               _within(clustering, others)),
            "auc": auc_interval(members.astype(np.int64), probabilities[:, c], confidence,
                                clustering),
        }
    present = np.flatnonzero(support)
    if not len(present):
        balanced_accuracy = Interval(None, None, None, WILSON_MOVER)
    elif _clusters_within_classes(labels, clustering):
        # the classes' recalls are independent where no group holds two classes
        recalls = [per_class[classes[c]]["sensitivity"] for c in present]
        balanced_accuracy = _mover([(r.estimate, r.low, r.high) for r in recalls],
                                   [1 / len(present)] * len(present), CLUSTERED_MOVER)
    else:
        balanced_accuracy = mover_wilson(confusion[present, present].tolist(),
                                         support[present].tolist(),
                                         [1 / len(present)] * len(present), confidence)
    if k == 2:
        sensitivity = per_class[classes[1]]["sensitivity"]
        specificity = per_class[classes[1]]["specificity"]
    else:
        sensitivity, specificity = balanced_accuracy, boot["specificity"]
    return {
        "n": n,
        "accuracy": proportion_interval(predictions == labels, confidence, clustering),
        "balanced_accuracy": balanced_accuracy,
        # two classes: the AUC of P(class 1), as the one-vs-rest AUC of class 1
        "auc": per_class[classes[1]]["auc"] if k == 2 else boot["auc"],
        "sensitivity": sensitivity,
        "specificity": specificity,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


# ---------------------------------------------------------------- operating point

def operating_threshold(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The operating point chosen on (clean) data: the threshold on the positive class's
    score (label 1) that maximises Youden's J = sensitivity + specificity - 1, an image
    being called positive when its score is >= the threshold.

    The threshold sits midway between the chosen score and the next lower one,
    so it does not rest on one image's exact score; among equal J the lowest
    threshold wins (screening favours sensitivity). None with one class only.
    """
    labels = _integer_labels(labels)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape != labels.shape or not np.isfinite(scores).all():
        raise InputError(f"need one finite score per label, got {scores.shape} for "
                         f"{labels.shape}")
    positives, negatives = np.sort(scores[labels == 1]), np.sort(scores[labels != 1])
    if positives.size == 0 or negatives.size == 0:
        return None
    candidates = np.unique(scores)
    sensitivity = 1.0 - np.searchsorted(positives, candidates, side="left") / positives.size
    specificity = np.searchsorted(negatives, candidates, side="left") / negatives.size
    best = int(np.argmax(sensitivity + specificity))
    if best == 0:
        return float(candidates[0])
    return float((candidates[best] + candidates[best - 1]) / 2.0)


def sensitivity_at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float,
                             confidence: float = CONFIDENCE, clusters: Any = None) -> Interval:
    """The fraction of positives (label 1) whose score is >= `threshold`, with its exact
    interval (with `clusters`, Korn and Graubard's over them); the threshold is taken as
    fixed (chosen on other data: the val split)."""
    labels = _integer_labels(labels)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = labels == 1
    return proportion_interval(scores[positive] >= threshold, confidence,
                               _within(cluster_index(clusters, len(labels)), positive))


def t_mean(values: np.ndarray, confidence: float = CONFIDENCE,
           bounds: tuple[float, float] = (0.0, 1.0), clusters: Any = None) -> Interval:
    """Mean of per-unit values with Student's t interval, mean ± t(n-1) s/√n, cut to the
    values' possible `bounds`.

    For per-image quantities such as the fraction of perturbations an image
    survives, or a mean of per-slide AUCs, whose mean is not a single
    binomial proportion. Student's t rather than a percentile bootstrap:
    over few units (8 slides) the bootstrap's interval held the true mean in
    89 % of simulated sets, t in 95 %. The units are one sample, not one per
    class: like the exact interval of an accuracy, the interval includes how
    the mix of classes could have fallen. One value has no interval (None);
    identical values give a point.

    With `clusters` (`cluster_index`; images of one patient) the units are the
    k clusters: the ratio estimate Σv/n with its linearised variance
    k/(k-1) Σ_g (v_g - mean m_g)² / n² over the clusters' sums v_g and sizes
    m_g, and t with k - 1 degrees of freedom; with one unit per cluster that is
    the interval above. A Wald-type interval: with few clusters its variance is
    itself uncertain and its coverage can fall below the nominal (93-95 % with
    10-50 patients of 1-4 images in bench/coverage_clustered.py).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise InputError(f"values must be 1-D; got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise InputError("values contain NaN or infinite values")
    _check_confidence(confidence)
    if len(values) == 0:
        return Interval(None, None, None, STUDENT_T)
    mean = float(values.mean())
    clustering = cluster_index(clusters, len(values))
    method = STUDENT_T if clustering is None else CLUSTERED_T
    units = len(values) if clustering is None else clustering[1]
    if units == 1:
        return Interval(mean, None, None, method)
    if clustering is None:
        standard_error = values.std(ddof=1) / math.sqrt(len(values))
    else:
        member_of, k = clustering
        residuals = (np.bincount(member_of, weights=values, minlength=k)
                     - mean * np.bincount(member_of, minlength=k))
        standard_error = math.sqrt(k / (k - 1) * float((residuals ** 2).sum())) / len(values)
    from scipy.stats import t  # as in clopper_pearson

    half = float(t.ppf(0.5 + confidence / 2.0, units - 1) * standard_error)
    return Interval(mean, max(bounds[0], mean - half), min(bounds[1], mean + half), method)


# ---------------------------------------------------------------- two models

def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray, clusters: Any = None) -> dict:
    """McNemar's exact test of two models' per-sample correctness on the same samples.

    Only discordant pairs carry information about which model is better; under
    the null each is equally likely to favour either, so the p-value is the
    exact two-sided binomial test of the split (1.0 when there are none).

    With `clusters` (`cluster_index`) the p-value is the sign-flip test of each
    cluster's only-b minus only-a count instead: a patient's images flip
    together under the null. The counts stay per sample; `groups` says how many
    clusters there were.
    """
    a = _boolean_vector(correct_a, "correct_a")
    b = _boolean_vector(correct_b, "correct_b")
    if len(a) != len(b):
        raise InputError(f"correct_a and correct_b must be paired; lengths {len(a)} and {len(b)}")
    only_a = int((a & ~b).sum())
    only_b = int((b & ~a).sum())
    discordant = only_a + only_b
    from scipy.stats import binomtest  # as in clopper_pearson

    clustering = cluster_index(clusters, len(a))
    if clustering is not None:
        test = sign_flip_test(b.astype(np.int64) - a.astype(np.int64), clustering)
        return {"n": len(a), "only_a_correct": only_a, "only_b_correct": only_b,
                "p_value": test["p_value"], "groups": clustering[1]}
    p_value = 1.0 if discordant == 0 else float(binomtest(only_b, discordant, 0.5).pvalue)
    return {"n": len(a), "only_a_correct": only_a, "only_b_correct": only_b,
            "p_value": min(1.0, p_value)}


def sign_flip_test(differences: np.ndarray, clusters: Any = None) -> dict:
    """The exact two-sided permutation test of paired integer differences (Fisher-Pitman).

    Under "no difference" each pair's difference is as likely to have either
    sign, so the p-value is the share of the 2^m sign assignments of the m
    non-zero differences whose sum is at least as far from 0 as the observed
    one. Unlike the sign test it weighs each pair by how much it moved, the
    quantity a mean difference and its interval show. Exact: differences of
    equal size are grouped, each group's sum is a scaled binomial, and the
    groups' distributions are convolved (sizes up to a few hundred units per
    pair, as in counts of perturbations survived). McNemar's exact test is
    the case of differences in {-1, 0, 1}.

    With `clusters` (one key per pair: the patient) the signs are flipped per
    cluster, on the clusters' sums of differences: the cluster-level
    permutation test, exact as above, since a cluster's pairs are not
    independent. `better`, `worse` and `sum` still count pairs.
    """
    values = np.asarray(differences)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise InputError(f"differences must be a 1-D array of integers, got {values.dtype} "
                         f"of shape {values.shape}")
    result = {"n": len(values), "better": int((values > 0).sum()),
              "worse": int((values < 0).sum()), "sum": int(values.sum())}
    if clusters is not None:   # each cluster's sum
        member_of, k = cluster_numbers(clusters, len(values))
        values = np.bincount(member_of, weights=values, minlength=k).round().astype(np.int64)
    nonzero = values[values != 0]
    observed = result["sum"]
    if len(nonzero) == 0:
        return {**result, "p_value": 1.0}
    from scipy.signal import convolve  # as scipy.stats in clopper_pearson

    total = int(np.abs(nonzero).sum())
    distribution = np.ones(1)   # of the sum, over -total..total as groups are added
    for size, count in zip(*np.unique(np.abs(nonzero), return_counts=True)):
        size, count = int(size), int(count)
        group = np.zeros(2 * size * count + 1)   # the group's sum: size * (2 * positives - count)
        group[::2 * size] = _half_binomial(count)
        # direct sums where they are cheap: FFT's rounding (1e-16) would move an exact
        # p-value such as 2/64 off the dyadic alpha a user may set
        distribution = convolve(distribution, group, method="direct"
                                if distribution.size * group.size < 10 ** 7 else "fft")
    sums = np.arange(-total, total + 1)
    p_value = float(np.clip(distribution, 0, None)[np.abs(sums) >= abs(observed)].sum())
    return {**result, "p_value": min(1.0, p_value)}


def _paired_interval(strata: np.ndarray, statistic_a: Callable[[np.ndarray], np.ndarray],
                     statistic_b: Callable[[np.ndarray], np.ndarray], n_resamples: int,
                     seed: int, confidence: float,
                     clusters: Clustering | None = None) -> Interval:
    """Interval of statistic_b - statistic_a, both evaluated on the same resamples
    (`_resample_weights`: stratified, or by `clusters`)."""
    def statistics(weights: np.ndarray) -> dict[str, np.ndarray]:
        return {"difference": statistic_b(weights) - statistic_a(weights)}

    return _bootstrap(statistics, strata, n_resamples, seed, confidence,
                      PAIRED if clusters is None else PAIRED_CLUSTERS, clusters)["difference"]


def _check_paired_scores(labels: np.ndarray, scores_a: Any, scores_b: Any,
                         ) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(scores_a), np.asarray(scores_b)
    if a.shape != b.shape:
        raise InputError(f"scores_a and scores_b must have the same shape; got {a.shape} "
                         f"and {b.shape}")
    if a.ndim not in (1, 2) or a.shape[0] != len(labels):
        raise InputError(f"scores must be 1-D or 2-D with one row per label; got shape "
                         f"{a.shape} for {len(labels)} labels")
    return a, b


def _half_binomial(count: int) -> list[float]:
    """P(k of `count` fair coins land heads) for k = 0..count, each the exact integer
    C(count, k) over 2^count rounded once (scipy's pmf is off in the last digits, enough
    to move an exact p-value such as 2/64 off a dyadic alpha)."""
    coefficients, coefficient = [], 1
    for heads in range(count + 1):
        coefficients.append(coefficient)
        coefficient = coefficient * (count - heads) // (heads + 1)
    scale = 2 ** count
    return [value / scale for value in coefficients]


def holm_adjusted(p_values: Any) -> np.ndarray:
    """Holm's step-down adjusted p-values (Scand J Stat 1979;6:65-70): rejecting where an
    adjusted p is below alpha keeps the chance of any false rejection in the family at
    alpha. The k-th smallest p is multiplied by (m - k + 1), then made non-decreasing."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
        raise InputError(f"p-values must be a 1-D array in [0, 1], got {p!r}")
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, p[order] * (len(p) - np.arange(len(p))))
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def smallest_detectable_difference(n: int, alpha: float = 0.05,
                                   groups: int | None = None) -> float | None:
    """The smallest accuracy difference McNemar's exact test could call significant with n pairs.

    Even when all k discordant pairs favour one model the two-sided p-value is
    2 * 0.5**k, so fewer than the smallest k with 2 * 0.5**k < alpha can never
    be significant; as a fraction of n that bounds what a test set can resolve.
    None when k exceeds n. With the n pairs in `groups` clusters, the sign-flip
    test of the clusters' sums needs k clusters that moved, at least one pair
    each: still k / n, but None when k exceeds the number of clusters.
    """
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    if int(n) != n or n < 0:
        raise InputError(f"n must be a non-negative integer, got {n}")
    k = 1
    while 2.0 * 0.5 ** k >= alpha:
        k += 1
    return None if k > (n if groups is None else min(n, groups)) else k / int(n)


def paired_comparison(labels: np.ndarray, probabilities_a: np.ndarray,
                      probabilities_b: np.ndarray, n_resamples: int = N_RESAMPLES,
                      seed: int = 0, confidence: float = CONFIDENCE,
                      alpha: float = 0.05, clusters: Any = None) -> dict:
    """Model b (e.g. a defense) against model a (e.g. the baseline) on the same samples.

    Accuracies are exact binomial intervals; the accuracy difference (b minus a)
    has Newcombe's paired score interval; the AUC difference, with two classes,
    `paired_auc_difference`, with more (macro AUCs) a paired, stratified
    bootstrap; the verdict rests on McNemar's exact test at level alpha, and
    `smallest_detectable_difference` says how large a difference this many
    samples could have shown at all.

    With `clusters` (`cluster_index`: the samples' patients or lesions) the
    accuracies get Korn and Graubard's interval, the accuracy difference the
    clustered t interval of the per-sample differences (`t_mean`), and the
    verdict and the smallest detectable difference the sign-flip test of the
    per-cluster sums (`mcnemar_exact`), and the AUC difference with two classes
    `paired_auc_difference` over them; with more classes the macro AUCs' paired
    bootstrap draws whole clusters (`_resample_weights`).
    """
    labels = _integer_labels(labels)
    probabilities_a = _check_probabilities(probabilities_a, len(labels), name="probabilities_a")
    probabilities_b = _check_probabilities(probabilities_b, len(labels), name="probabilities_b")
    if probabilities_a.shape != probabilities_b.shape:
        raise InputError(f"probabilities_a and probabilities_b must have the same shape; got "
                         f"{probabilities_a.shape} and {probabilities_b.shape}")
    _check_label_range(labels, probabilities_a.shape[1])
    _check_resamples(n_resamples)
    _check_confidence(confidence)
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must lie strictly between 0 and 1, got {alpha}")

    scorer_a, scorer_b = _Scorer(labels, probabilities_a), _Scorer(labels, probabilities_b)
    n = len(labels)
    clustering = cluster_index(clusters, n)

    if probabilities_a.shape[1] == 2:  # P(class 1), as the binary AUC is everywhere
        auc_difference = paired_auc_difference(labels, probabilities_a[:, 1],
                                               probabilities_b[:, 1], confidence, clustering)
    else:
        auc_difference = _paired_interval(labels, scorer_a.auc, scorer_b.auc, n_resamples,
                                          seed, confidence, clustering)
    correct_a = scorer_a.predictions == labels
    correct_b = scorer_b.predictions == labels
    mcnemar = mcnemar_exact(correct_a, correct_b, clustering)
    verdict = _verdict(mcnemar, alpha)
    if clustering is None:
        both = int((correct_a & correct_b).sum())
        accuracy_difference = newcombe_paired_difference(
            mcnemar["only_a_correct"], mcnemar["only_b_correct"], both,
            n - both - mcnemar["only_a_correct"] - mcnemar["only_b_correct"], confidence)
    else:
        accuracy_difference = t_mean(correct_b.astype(float) - correct_a.astype(float),
                                     confidence, bounds=(-1.0, 1.0), clusters=clustering)
    return {
        "n": n,
        "accuracy_a": proportion_interval(correct_a, confidence, clustering),
        "accuracy_b": proportion_interval(correct_b, confidence, clustering),
        "accuracy_difference": accuracy_difference,
        "auc_difference": auc_difference,
        "mcnemar": mcnemar,
        "test": MCNEMAR if clustering is None else CLUSTERED_SIGN_FLIP,
        "verdict": verdict,
        "auc_caveat": auc_caveat(verdict, auc_difference),
        "smallest_detectable_difference": smallest_detectable_difference(
            n, alpha, None if clustering is None else clustering[1]),
    }


def proportion_interval(correct: np.ndarray, confidence: float = CONFIDENCE,
                        clusters: Any = None) -> Interval:
    """The share of samples that are a success (classified right, caught): exact binomial,
    or with `clusters` (more than one sample in some cluster) Korn and Graubard's interval
    over them."""
    clustering = cluster_index(clusters, len(correct))
    if clustering is None:
        return clopper_pearson(int(np.sum(correct)), len(correct), confidence)
    return clustered_proportion(correct, clustering, confidence)


def interval_columns(name: str, interval: Interval | None) -> dict[str, float | None]:
    """An interval as three table columns: `name`, `name_low`, `name_high` (None if absent)."""
    interval = interval or Interval(None, None, None, "")
    return {name: interval.estimate, f"{name}_low": interval.low, f"{name}_high": interval.high}


# the keys of `comparison_columns`, in its order: every comparisons table's columns
COMPARISON_KEYS = ("n", "reference_accuracy", "accuracy", "accuracy_difference",
                   "accuracy_difference_low", "accuracy_difference_high", "auc_difference",
                   "auc_difference_low", "auc_difference_high", "only_reference_correct",
                   "only_model_correct", "p_value", "test", "verdict", "auc_caveat",
                   "smallest_detectable_difference")


def comparison_columns(comparison: dict, with_auc: bool = True) -> dict[str, Any]:
    """A `paired_comparison` result as the columns of a comparisons table (docs/report.md,
    comparisons.csv): a is the reference, b the model. `with_auc` False leaves the AUC
    difference out, where no single ranking exists (a worst case over attacks)."""
    auc = comparison["auc_difference"] if with_auc else None
    return {"n": comparison["n"],
            "reference_accuracy": comparison["accuracy_a"].estimate,
            "accuracy": comparison["accuracy_b"].estimate,
            **interval_columns("accuracy_difference", comparison["accuracy_difference"]),
            **interval_columns("auc_difference", auc),
            "only_reference_correct": comparison["mcnemar"]["only_a_correct"],
            "only_model_correct": comparison["mcnemar"]["only_b_correct"],
            "p_value": comparison["mcnemar"]["p_value"],
            "test": comparison["test"], "verdict": comparison["verdict"],
            "auc_caveat": None if auc is None else comparison["auc_caveat"],
            "smallest_detectable_difference": comparison["smallest_detectable_difference"]}


def count_comparison(reference_counts: np.ndarray, reference_trials: int,
                     model_counts: np.ndarray, model_trials: int,
                     confidence: float = CONFIDENCE, alpha: float = 0.05,
                     clusters: Any = None) -> dict[str, Any]:
    """Two models on the same units, each unit right in a count of its model's trials (the
    perturbations an image survives, the random removals that leave a slide correct): the
    columns of a comparisons table (`comparison_columns`' keys), the reference first.

    Per unit the difference in trials right, in units of one trial of either model (the
    least common multiple of the trial counts); the exact sign-flip test of their sum
    (which weighs a unit by how much it moved, as the mean does; the sign test counts only
    which way), the verdict's direction from the same sum, a paired t interval of the mean
    difference, and the smallest difference the test could call:
    `smallest_detectable_difference` units each one trial apart. No AUC difference: counts
    rank nothing. With `clusters` (the units' patients) the test is on the clusters' sums
    and the interval the clustered t (`sign_flip_test`, `t_mean`); the counts of units
    better and worse stay per unit.
    """
    units = math.lcm(reference_trials, model_trials)
    differences = (np.asarray(model_counts) * (units // model_trials)
                   - np.asarray(reference_counts) * (units // reference_trials))
    n = len(differences)
    clustering = cluster_index(clusters, n)
    test = sign_flip_test(differences, clustering)
    significant = test["p_value"] < alpha
    floor = smallest_detectable_difference(n, alpha,
                                           None if clustering is None else clustering[1])
    return {"n": n, "reference_accuracy": float(np.mean(reference_counts) / reference_trials),
            "accuracy": float(np.mean(model_counts) / model_trials),
            **interval_columns("accuracy_difference", t_mean(
                differences / units, confidence, bounds=(-1.0, 1.0), clusters=clustering)),
            **interval_columns("auc_difference", None),
            "only_reference_correct": test["worse"], "only_model_correct": test["better"],
            "p_value": test["p_value"],
            "test": SIGN_FLIP if clustering is None else CLUSTERED_SIGN_FLIP,
            "verdict": ("no detectable difference" if not significant
                        else "helped" if test["sum"] > 0 else "hurt"),
            "auc_caveat": None,
            "smallest_detectable_difference": None if floor is None else floor / units}


def across_folds(values: Any) -> dict:
    """Mean and spread of one metric over cross-validation folds: the sample standard
    deviation (ddof 1) of the fold values, which describes how much the folds' models
    differ; it is not a confidence interval of the metric. Undefined values (None: an
    AUC of a one-class split) are left out; `n` counts the folds that had one."""
    defined = np.array([value for value in values if value is not None], dtype=float)
    if len(defined) == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(defined.mean()),
            "sd": float(defined.std(ddof=1)) if len(defined) > 1 else None,
            "n": len(defined)}


def auc_caveat(verdict: str, auc_difference: Interval) -> str | None:
    """"AUC lower" or "AUC higher" where the paired AUC interval excludes 0 against the verdict.

    Accuracy counts decisions at one threshold; a model that leans towards the
    majority class can gain accuracy (or lose none) while it ranks the cases
    worse. The verdict stays McNemar's; this says when the AUC disagrees.
    """
    low, high = auc_difference.low, auc_difference.high
    if low is None or high is None or np.isnan(low) or np.isnan(high):
        return None
    if high < 0 and verdict != "hurt":
        return "AUC lower"
    if low > 0 and verdict != "helped":
        return "AUC higher"
    return None


def _verdict(mcnemar: dict, alpha: float) -> str:
    """Whether b helped or hurt by McNemar's test, or no difference could be detected."""
    if mcnemar["p_value"] < alpha and mcnemar["only_b_correct"] != mcnemar["only_a_correct"]:
        return "helped" if mcnemar["only_b_correct"] > mcnemar["only_a_correct"] else "hurt"
    return "no detectable difference"
