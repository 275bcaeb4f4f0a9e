"""Benchmark medrobust's FGSM / I-FGSM against a plain forward and forward+backward.

Model: medrobust's ResNet18 image classifier (1 input channel, 2 classes,
random weights, eval mode) on a batch of random 1x64x64 images in [0, 1].
Baselines, measured in the same run on the same model and batch:

- plain forward under `torch.inference_mode`;
- plain forward + backward to the input (`torch.autograd.grad` of the
  cross-entropy with respect to the images, parameters frozen): the work one
  FGSM step needs.

So "FGSM / forward" is the price of one gradient step, and
"FGSM / forward+backward" is the attack wrapper's own overhead (freezing the
model, clone, sign, projection and clipping), which should be close to 1.

    .venv/bin/python bench/bench_attacks.py
    .venv/bin/python bench/bench_attacks.py --batch-size 64 --image-size 128
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from medrobust.attacks import build_attack
from medrobust.models.image_classifiers import resnet18
from timing import interleaved_medians, machine_line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epsilon", type=float, default=4.0, help="in 1/255 units, as in config")
    parser.add_argument("--ifgsm-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(f"torch {torch.__version__}"))

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = resnet18(num_classes=2, in_channels=1).eval()
    images = torch.rand(args.batch_size, 1, args.image_size, args.image_size, generator=generator)
    labels = torch.randint(0, 2, (args.batch_size,), generator=generator)
    fgsm = build_attack("fgsm", model, args.epsilon)
    ifgsm = build_attack("ifgsm", model, args.epsilon, {"steps": args.ifgsm_steps})

    def forward() -> None:
        with torch.inference_mode():
            model(images)

    def forward_backward() -> None:
        model.requires_grad_(False)
        x = images.clone().requires_grad_(True)
        loss = F.cross_entropy(model(x), labels)
        torch.autograd.grad(loss, x)

    functions = {
        "forward": forward,
        "forward_backward": forward_backward,
        "fgsm": lambda: fgsm(images, labels),
        "ifgsm": lambda: ifgsm(images, labels),
    }
    medians = interleaved_medians(functions, args.repeats)

    print(f"\nResNet18 (medrobust image classifier, random weights), batch "
          f"{args.batch_size} x 1x{args.image_size}x{args.image_size}, epsilon "
          f"{args.epsilon:g}/255, median of {args.repeats}")
    names = {
        "forward": "baseline: forward (inference_mode)",
        "forward_backward": "baseline: forward + backward to the input",
        "fgsm": "medrobust FGSM",
        "ifgsm": f"medrobust I-FGSM, {args.ifgsm_steps} steps",
    }
    print(f"  {'':44s} {'median ms':>10s} {'images/s':>9s} {'x forward':>10s} "
          f"{'x fwd+bwd':>10s}")
    for key, name in names.items():
        seconds = medians[key]
        print(f"  {name:44s} {seconds * 1e3:10.1f} {args.batch_size / seconds:9.1f} "
              f"{seconds / medians['forward']:10.2f} {seconds / medians['forward_backward']:10.2f}")
    print("  x forward / x fwd+bwd = row time / baseline time (cost multiple; > 1 means slower)")


if __name__ == "__main__":
    sys.exit(main())
