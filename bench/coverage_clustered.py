"""How often the intervals for test images in groups hold the truth, and how often the
clustered test rejects a true "no difference", against the per-image methods in the same run.

Not speed: statistical coverage, simulated. Each simulated test set has k patients of 1, 2,
2 or 4 images (CBIS-DDSM's views); a patient's images share a latent difficulty (shared by
both models) and a preference for one of the two models, symmetric so that the models do
not differ on average. Printed per (k, spread of the latent effects): the share of sets
whose accuracy interval holds the population accuracy (Korn-Graubard over the patients
against Clopper-Pearson over the images), whose clustered t interval of the accuracy
difference holds the population difference, and whose test rejects at alpha 0.05 (the
sign-flip test of per-patient sums against McNemar's over the images). A second table
does the same for the AUC: patients of the same sizes whose images mostly share the
patient's label and whose two models' scores share a latent patient effect; the share of
sets whose AUC interval holds the population AUC (Newcombe's at the clustered effective
sizes against Newcombe's over the images), and whose AUC difference interval holds the
population difference (the MOVER with Obuchowski's correlation against DeLong's over the
images). A third does it for balanced accuracy with patients of one class each (the
MOVER of the classes' Korn-Graubard recalls against the Wilson MOVER over the images).
docs/report.md, "Test images in groups", has the results.
"""

from __future__ import annotations

import argparse

import numpy as np

from medrobust.evaluate.statistics import (
    auc_interval, auc_score, classification_statistics, clopper_pearson, mcnemar_exact,
    paired_auc_difference, proportion_interval, t_mean)

SIZES = (1, 2, 2, 4)   # images per patient
ACCURACY = 0.8         # of a patient of average difficulty
SHIFT = 2.5            # of a positive image's score, against the latent effects' spread
SAME_LABEL = 0.8       # the chance that an image has its patient's label
RECALLS = np.array([0.75, 0.85])   # per class, of a patient of average difficulty


def simulate(k: int, spread: float, rng: np.random.Generator, sizes: tuple[int, ...] = SIZES
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: model a right, model b right, and the patient."""
    patient = np.repeat(np.arange(k), rng.choice(sizes, k))
    difficulty = rng.normal(0, spread, k)[patient]
    preference = rng.normal(0, spread, k)[patient]   # + favours b, - favours a
    logit = np.log(ACCURACY / (1 - ACCURACY)) + difficulty
    p_a = 1 / (1 + np.exp(-(logit - preference)))
    p_b = 1 / (1 + np.exp(-(logit + preference)))
    shared = rng.random(len(patient))   # the models share some of their luck per image
    right_a = shared < p_a
    right_b = np.where(rng.random(len(patient)) < 0.3, shared < p_b,
                       rng.random(len(patient)) < p_b)
    return right_a, right_b, patient


def simulate_scores(k: int, spread: float, rng: np.random.Generator,
                    sizes: tuple[int, ...] = SIZES) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per image: the label, model a's and model b's score, and the patient. A patient's
    images mostly share its label and a latent effect on both models' scores (how its
    images look); b also has a per-patient preference that moves its positives and
    negatives apart or together; the two models' per-image noise is correlated."""
    patient = np.repeat(np.arange(k), rng.choice(sizes, k))
    images = len(patient)
    label = np.where(rng.random(images) < SAME_LABEL, rng.integers(0, 2, k)[patient],
                     rng.integers(0, 2, images))
    look = rng.normal(0, spread, k)[patient]
    preference = rng.normal(0, spread / 2, k)[patient] * (2 * label - 1)
    noise = rng.multivariate_normal([0, 0], [[1, 0.5], [0.5, 1]], size=images)
    return (label, SHIFT * label + look + noise[:, 0],
            SHIFT * label + look + preference + noise[:, 1], patient)


def measure_auc(k: int, spread: float, sims: int, seed: int, sizes: tuple[int, ...] = SIZES
                ) -> dict[str, float]:
    """Shares of sets whose AUC and AUC difference intervals hold the population's, over
    the sets with both classes (`defined`: their share of all)."""
    label, score_a, score_b, _ = simulate_scores(200_000, spread,
                                                 np.random.default_rng(seed + 1), sizes)
    truth_a = auc_score(label, score_a)
    truth_difference = auc_score(label, score_b) - truth_a
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(("clustered", "per_image", "clustered_difference",
                            "per_image_difference", "defined"), 0)
    for _ in range(sims):
        label, score_a, score_b, patient = simulate_scores(k, spread, rng, sizes)
        if label.min() == label.max():
            continue
        counts["defined"] += 1
        for name, clusters in (("clustered", patient), ("per_image", None)):
            interval = auc_interval(label, score_a, clusters=clusters)
            counts[name] += interval.low <= truth_a <= interval.high
            difference = paired_auc_difference(label, score_a, score_b, clusters=clusters)
            counts[f"{name}_difference"] += (difference.low <= truth_difference
                                             <= difference.high)
    return {name: count / max(counts["defined"], 1) for name, count in counts.items()
            if name != "defined"} | {"defined": counts["defined"] / sims}


def measure(k: int, spread: float, sims: int, seed: int, sizes: tuple[int, ...] = SIZES
            ) -> dict[str, float]:
    population_a, population_b, _ = simulate(200_000, spread, np.random.default_rng(seed + 1),
                                             sizes)
    true_accuracy = population_a.mean()
    true_difference = population_b.mean() - population_a.mean()
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(("kg", "cp", "t", "clustered", "per_image"), 0)
    for _ in range(sims):
        right_a, right_b, patient = simulate(k, spread, rng, sizes)
        kg = proportion_interval(right_a, clusters=patient)
        cp = clopper_pearson(int(right_a.sum()), len(right_a))
        difference = t_mean(right_b.astype(float) - right_a.astype(float), bounds=(-1, 1),
                            clusters=patient)
        counts["kg"] += kg.low <= true_accuracy <= kg.high
        counts["cp"] += cp.low <= true_accuracy <= cp.high
        counts["t"] += (difference.low is not None
                        and difference.low <= true_difference <= difference.high)
        counts["clustered"] += mcnemar_exact(right_a, right_b, patient)["p_value"] < 0.05
        counts["per_image"] += mcnemar_exact(right_a, right_b)["p_value"] < 0.05
    return {name: count / sims for name, count in counts.items()}


def simulate_classes(k: int, spread: float, rng: np.random.Generator,
                     sizes: tuple[int, ...] = SIZES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: its class, the model right, and the patient (lesion), every image of a
    patient of its one class; the recall is RECALLS[class] for a patient of average
    difficulty."""
    patient = np.repeat(np.arange(k), rng.choice(sizes, k))
    label = rng.integers(0, 2, k)[patient]
    logit = np.log(RECALLS / (1 - RECALLS))[label] + rng.normal(0, spread, k)[patient]
    return label, rng.random(len(patient)) < 1 / (1 + np.exp(-logit)), patient


def measure_balanced(k: int, spread: float, sims: int, seed: int,
                     sizes: tuple[int, ...] = SIZES) -> dict[str, float]:
    """Shares of sets (with both classes) whose balanced accuracy interval holds the
    population's: the MOVER of the classes' Korn-Graubard recalls over the patients, and
    the Wilson MOVER over the images."""
    label, right, _ = simulate_classes(200_000, spread, np.random.default_rng(seed + 1), sizes)
    truth = np.mean([right[label == c].mean() for c in (0, 1)])
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(("clustered", "per_image", "defined"), 0)
    for _ in range(sims):
        label, right, patient = simulate_classes(k, spread, rng, sizes)
        if label.min() == label.max():
            continue
        counts["defined"] += 1
        predicted = np.where(right, label, 1 - label)
        probabilities = np.stack([1 - predicted, predicted], axis=1) * 0.8 + 0.1
        for name, clusters in (("clustered", patient), ("per_image", None)):
            interval = classification_statistics(label, probabilities, ["0", "1"],
                                                 clusters=clusters)["balanced_accuracy"]
            counts[name] += interval.low <= truth <= interval.high
    return {name: count / max(counts["defined"], 1) for name, count in counts.items()
            if name != "defined"}


def print_table(header: str, measure_row, columns: list[list[tuple[str, int]]],
                args: argparse.Namespace) -> None:
    """One row per (spread, number of patients): `measure_row`'s shares under `header`,
    in `columns` (groups of (key, width), the groups apart by a bar)."""
    print(header)
    for spread in args.spreads:
        for k in args.patients:
            result = measure_row(k, spread, args.sims, args.seed, tuple(args.sizes))
            print(f"{k:8d}  {spread:6.1f} | " + " | ".join(
                "  ".join(f"{result[key]:{width}.3f}" for key, width in group)
                for group in columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--spreads", type=float, nargs="+", default=[1.0, 2.0],
                        help="standard deviation of the latent effects (on the logit scale "
                             "for accuracy, on the scores' for the AUC)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES),
                        help="images per patient, each patient drawing one of these")
    parser.add_argument("--sims", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print_table("patients  spread | accuracy held: Korn-Graubard  Clopper-Pearson | difference "
                "held: clustered t | rejects when equal: clustered  McNemar", measure,
                [[("kg", 27), ("cp", 15)], [("t", 30)], [("clustered", 19), ("per_image", 7)]],
                args)
    print()
    print_table("patients  spread | AUC held: clustered Newcombe  per-image | difference held: "
                "clustered MOVER  per-image", measure_auc,
                [[("clustered", 28), ("per_image", 9)],
                 [("clustered_difference", 32), ("per_image_difference", 9)]], args)
    print()
    print_table("patients  spread | balanced accuracy held (patients of one class): clustered "
                "MOVER  Wilson MOVER per image", measure_balanced,
                [[("clustered", 65), ("per_image", 26)]], args)


if __name__ == "__main__":
    main()
