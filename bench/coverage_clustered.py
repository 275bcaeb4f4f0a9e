"""How often the intervals for test images in groups hold the truth, and how often the
clustered test rejects a true "no difference", against the per-image methods in the same run.

Not speed: statistical coverage, simulated. Each simulated test set has k patients of 1, 2,
2 or 4 images (CBIS-DDSM's views); a patient's images share a latent difficulty (shared by
both models) and a preference for one of the two models, symmetric so that the models do
not differ on average. Printed per (k, spread of the latent effects): the share of sets
whose accuracy interval holds the population accuracy (Korn-Graubard over the patients
against Clopper-Pearson over the images), whose clustered t interval of the accuracy
difference holds the population difference, and whose test rejects at alpha 0.05 (the
sign-flip test of per-patient sums against McNemar's over the images). docs/report.md,
"Test images in groups", has the results.
"""

from __future__ import annotations

import argparse

import numpy as np

from medrobust.evaluate.statistics import (
    clopper_pearson, mcnemar_exact, proportion_interval, t_mean)

SIZES = (1, 2, 2, 4)   # images per patient
ACCURACY = 0.8         # of a patient of average difficulty


def simulate(k: int, spread: float, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: model a right, model b right, and the patient."""
    patient = np.repeat(np.arange(k), rng.choice(SIZES, k))
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


def measure(k: int, spread: float, sims: int, seed: int) -> dict[str, float]:
    population_a, population_b, _ = simulate(200_000, spread, np.random.default_rng(seed + 1))
    true_accuracy = population_a.mean()
    true_difference = population_b.mean() - population_a.mean()
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(("kg", "cp", "t", "clustered", "per_image"), 0)
    for _ in range(sims):
        right_a, right_b, patient = simulate(k, spread, rng)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--spreads", type=float, nargs="+", default=[1.0, 2.0],
                        help="standard deviation of the latent effects on the logit scale")
    parser.add_argument("--sims", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("patients  spread | accuracy held: Korn-Graubard  Clopper-Pearson | difference "
          "held: clustered t | rejects when equal: clustered  McNemar")
    for spread in args.spreads:
        for k in args.patients:
            result = measure(k, spread, args.sims, args.seed)
            print(f"{k:8d}  {spread:6.1f} | {result['kg']:27.3f}  {result['cp']:15.3f} | "
                  f"{result['t']:30.3f} | {result['clustered']:19.3f}  "
                  f"{result['per_image']:7.3f}")


if __name__ == "__main__":
    main()
