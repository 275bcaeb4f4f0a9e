"""Metrics and predictions for classifiers on clean, adversarial and perturbed inputs."""
